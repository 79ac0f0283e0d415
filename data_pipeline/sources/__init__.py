"""Where samples come from: ``open_source(spec)`` picks synthetic scenes, digits or external files."""

from __future__ import annotations

from data_pipeline.sources.base import Partition, Rejected, Sample, Source
from data_pipeline.sources.digits import DigitsSource
from data_pipeline.sources.external import ExternalSource
from data_pipeline.sources.synthetic import HELDOUT_COMBINATIONS, SyntheticSource

__all__ = [
    "HELDOUT_COMBINATIONS",
    "DigitsSource",
    "ExternalSource",
    "Partition",
    "Rejected",
    "Sample",
    "Source",
    "SyntheticSource",
    "open_source",
]


def open_source(
    spec: str,
    *,
    image_size: int = 64,
    seed: int = 0,
    split: str = "train",
    skip: int = 0,
    max_file_bytes: int = 64 * 2**20,
) -> Source:
    """``"synthetic"``, ``"digits"``, or a folder / ``*.tar`` shards / ``*.parquet`` path or URL
    (files over ``max_file_bytes`` are rejected unread)."""
    if skip and spec != "digits":
        raise ValueError(f"skip={skip} exists only for the digits source, not {spec!r}")
    if spec == "synthetic":
        return SyntheticSource(image_size=image_size, seed=seed, split=split)
    if split != "train":
        raise ValueError(f"split={split!r} exists only for the synthetic source, not {spec!r}")
    if spec == "digits":
        return DigitsSource(image_size=image_size, seed=seed, skip=skip)
    return ExternalSource.open(spec, max_file_bytes)
