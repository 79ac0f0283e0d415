"""Compositional synthetic scenes: coloured shapes with sizes, positions and pairwise relations.

The point is a dataset whose captions are ground truth: an alignment eval can check whether a
generated "small red circle to the left of a large blue square" really shows that, and the
held-out (colour, shape) pairs measure compositional generalisation, because training never sees
them. Scene ``i`` is a pure function of ``(seed, split, i)``, so partitions render in parallel and
reruns reproduce every pixel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.sources.base import Partition, Rejected, Sample, range_partitions

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 180, 70),
    "cyan": (40, 200, 210),
    "blue": (45, 85, 225),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
# Object extent as a fraction of the image side; both fit inside one cell of the 3x3 layout grid.
SIZES = {"small": 0.17, "large": 0.31}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# (colour, shape) pairs that never appear in split="train"; split="heldout" scenes contain at least one.
HELDOUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "hexagon"),
    ("yellow", "triangle"),
    ("purple", "circle"),
)
SPLITS = ("train", "heldout")
GRID = 3
SUPERSAMPLE = 4
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "centre", "right")

SINGLE_TEMPLATES = (
    "{a}",
    "a picture of {a}",
    "{a} on a dark background",
    "there is {a}",
    "{a} {where}",
)
PAIR_TEMPLATES = (
    "{a} {rel} {b}",
    "{b} {inv} {a}",
    "a picture of {a} {rel} {b}",
    "there is {a} {rel} {b}",
    "{a} is {rel} {b}",
)
THIRD_TEMPLATES = ("{pair}, and {c}", "{pair}, with {c} nearby")

TRAIN_PAIRS = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBINATIONS]
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def phrase(obj: dict[str, Any]) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def where_phrase(position: str) -> str:
    """ "top left" -> "in the top left corner", "left" -> "on the left", "top" -> "at the top"."""
    if position == "centre":
        return "in the centre"
    if position in COLUMN_NAMES:
        return f"on the {position}"
    if position in ROW_NAMES:
        return f"at the {position}"
    return f"in the {position} corner"


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return COLUMN_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COLUMN_NAMES[col]}"


def _choose_attributes(rng: np.random.Generator, count: int, split: str) -> list[tuple[str, str, str]]:
    """Distinct (colour, shape, size) triples; held-out pairs excluded in train, forced once in heldout."""
    forced = int(rng.integers(count)) if split == "heldout" else -1
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < count:
        pool = (
            HELDOUT_COMBINATIONS
            if len(chosen) == forced
            else (TRAIN_PAIRS if split == "train" else ALL_PAIRS)
        )
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = ("small", "large")[int(rng.integers(2))]
        if (colour, shape, size) not in chosen:  # identical objects would make a relation ambiguous
            chosen.append((colour, shape, size))
    return chosen


def _choose_cells(rng: np.random.Generator, count: int, relation: str | None) -> list[tuple[int, int]]:
    """Distinct grid cells; cells of objects 0 and 1 make ``relation`` strictly true of their boxes."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    while True:
        picks = rng.choice(len(cells), size=count, replace=False)
        chosen = [cells[int(k)] for k in picks]
        if relation is None:
            return chosen
        (r0, c0), (r1, c1) = chosen[0], chosen[1]
        holds = {"left of": c0 < c1, "right of": c0 > c1, "above": r0 < r1, "below": r0 > r1}[relation]
        if holds:
            return chosen


def _shape_points(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "star":
        return [
            (
                cx + (half if k % 2 == 0 else half * 0.45) * math.sin(math.pi * k / 5),
                cy - (half if k % 2 == 0 else half * 0.45) * math.cos(math.pi * k / 5),
            )
            for k in range(10)
        ]
    if shape == "hexagon":
        return [
            (cx + half * math.cos(math.pi * k / 3), cy + half * math.sin(math.pi * k / 3)) for k in range(6)
        ]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
        draw.polygon(_shape_points(shape, cx, cy, half), fill=fill)


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A dark, slightly tinted backdrop with low-frequency texture."""
    base = rng.uniform(20, 70) + rng.uniform(-8, 8, size=3)
    coarse = np.clip(base + rng.normal(0, 10, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(coarse, mode="RGB").resize((side, side), Image.BICUBIC).convert("RGBA")


def generate_scene(seed: int, index: int, *, image_size: int = 64, split: str = "train") -> Sample:
    """Scene ``index`` of the stream ``(seed, split)``: image, caption and its ground-truth attributes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    count = int(rng.integers(1, 4))
    relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))] if count >= 2 else None
    attributes = _choose_attributes(rng, count, split)
    cells = _choose_cells(rng, count, relation)

    big = image_size * SUPERSAMPLE
    background = _background(rng, image_size)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cell = big / GRID
    objects = []
    for (colour, shape, size), (row, col) in zip(attributes, cells):
        half = SIZES[size] * big / 2
        slack = cell / 2 - half
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(int(v) for v in np.clip(np.add(COLOURS[colour], rng.integers(-15, 16, size=3)), 0, 255))
        box = (cx - half, cy - half, cx + half, cy + half)
        _draw(draw, shape, box, (*fill, 255))
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size,
                "bbox": [round(v / SUPERSAMPLE, 2) for v in box],
                "position": position_name(row, col),
            }
        )
    # Shapes are drawn SUPERSAMPLE times larger and box-filtered down: anti-aliased edges.
    shapes = layer.resize((image_size, image_size), Image.BOX)
    small = np.asarray(Image.alpha_composite(background, shapes).convert("RGB"), dtype=np.float32)
    noisy = np.clip(small + rng.normal(0, 3, size=small.shape), 0, 255).astype(np.uint8)

    caption, template = _caption(rng, objects, relation)
    metadata = {
        "source": "synthetic",
        "seed": seed,
        "split": split,
        "index": index,
        "objects": objects,
        "relation": None if relation is None else {"subject": 0, "relation": relation, "object": 1},
        "template": template,
    }
    return Sample(image=noisy, caption=caption, metadata=metadata)


def _caption(
    rng: np.random.Generator, objects: list[dict[str, Any]], relation: str | None
) -> tuple[str, str]:
    if relation is None:
        template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        return template.format(a=phrase(objects[0]), where=where_phrase(objects[0]["position"])), template
    template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
    text = template.format(
        a=phrase(objects[0]), b=phrase(objects[1]), rel=RELATIONS[relation], inv=RELATIONS[INVERSE[relation]]
    )
    if len(objects) == 3:
        third = THIRD_TEMPLATES[int(rng.integers(len(THIRD_TEMPLATES)))]
        text = third.format(pair=text, c=phrase(objects[2]))
        template = third.format(pair=template, c="{c}")
    return text, template


def heldout_prompts() -> list[str]:
    """Captions naming the colour/shape pairs the training split never shows (for sampling and evals)."""
    return [
        phrase({"size": size, "colour": c, "shape": s})
        for c, s in HELDOUT_COMBINATIONS
        for size in ("large", "small")
    ]


def contains_heldout(metadata: dict[str, Any]) -> bool:
    return any((obj["colour"], obj["shape"]) in HELDOUT_COMBINATIONS for obj in metadata["objects"])


@dataclass(frozen=True)
class SyntheticSource:
    """The unbounded scene stream; ``num_samples`` decides how much of it an ingest takes."""

    image_size: int = 64
    seed: int = 0
    split: str = "train"
    kind: ClassVar[str] = "synthetic"
    spec: ClassVar[str] = "synthetic"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {self.split!r}")

    def partitions(self, num_partitions: int, num_samples: int | None) -> list[Partition]:
        if num_samples is None:
            raise ValueError("the synthetic source is unbounded: give num_samples")
        return range_partitions(num_samples, num_partitions)

    def read(self, partition: Partition) -> Iterator[tuple[int, Sample | Rejected]]:
        start, stop = partition.items
        for index in range(start, stop):
            yield index, generate_scene(self.seed, index, image_size=self.image_size, split=self.split)

    def lineage(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "seed": self.seed, "split": self.split}

    def info(self) -> dict[str, Any]:
        return {
            "heldout_combinations": [list(pair) for pair in HELDOUT_COMBINATIONS],
            "heldout_prompts": heldout_prompts(),
        }
