"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) as captioned images."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from data_pipeline.sources.base import Partition, Rejected, Sample, range_partitions

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {digit}",
    "the digit {word}, handwritten",
    "a handwritten number {word}",
    "a scanned handwritten digit {digit}",
    "the number {digit} written by hand",
)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def num_digits() -> int:
    return len(_digits()[1])


@dataclass(frozen=True)
class DigitsSource:
    """Digits in a seeded order (so a small ``num_samples`` still covers every class), dark ink on white.

    ``skip`` passes over the first scans of that order, so ingests with one seed and disjoint
    ``[skip, skip + num_samples)`` ranges get disjoint scans (model train / judge / eval sets).
    """

    image_size: int = 64
    seed: int = 0
    skip: int = 0
    kind: ClassVar[str] = "digits"
    spec: ClassVar[str] = "digits"

    def _order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(num_digits())

    def partitions(self, num_partitions: int, num_samples: int | None) -> list[Partition]:
        available = num_digits() - self.skip
        if available <= 0:
            raise ValueError(f"skip={self.skip}: the digits source has {num_digits()} samples")
        if num_samples is not None and num_samples > available:
            raise ValueError(
                f"the digits source has {num_digits()} samples, {available} after skip={self.skip}; "
                f"asked for {num_samples}"
            )
        ranges = range_partitions(num_samples or available, num_partitions)
        return [Partition(p.index, (p.items[0] + self.skip, p.items[1] + self.skip)) for p in ranges]

    def read(self, partition: Partition) -> Iterator[tuple[int, Sample | Rejected]]:
        images, labels = _digits()
        order = self._order()
        start, stop = partition.items
        for index in range(start, stop):
            original = int(order[index])
            yield index, self.sample(images[original], int(labels[original]), original, index)

    def sample(self, pixels: np.ndarray, label: int, original: int, index: int) -> Sample:
        # Raw values are ink density 0..16; upscale with bicubic so strokes stay smooth, not blocky.
        grey = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((self.image_size, self.image_size), Image.BICUBIC)
        template = TEMPLATES[int(np.random.default_rng([self.seed, index]).integers(len(TEMPLATES)))]
        caption = template.format(digit=label, word=NUMBER_WORDS[label])
        metadata = {"source": "digits", "label": label, "sklearn_index": original, "index": index}
        return Sample(image=image.convert("RGB"), caption=caption, metadata=metadata)

    def info(self) -> dict[str, Any]:
        return {}

    def lineage(self) -> dict[str, Any]:
        lineage = {"spec": self.spec, "kind": self.kind, "seed": self.seed, "split": "train"}
        return lineage | ({"skip": self.skip} if self.skip else {})
