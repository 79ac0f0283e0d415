"""What every source yields, and how a source is cut into partitions that Ray tasks read in parallel."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

# An image as a source hands it over: decoded (PIL or uint8 HxWx3) or still-encoded bytes, which
# ingestion decodes itself so an undecodable file becomes a counted reject instead of a crash.
ImageLike = Image.Image | np.ndarray | bytes


@dataclass(frozen=True)
class Sample:
    image: ImageLike
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    """A record a source could not turn into a sample (unsafe tar member, truncated shard, ...)."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Partition:
    """One unit of parallel reading: ``items`` is source-specific (an index range, files, row groups)."""

    index: int
    items: tuple[Any, ...]


@runtime_checkable
class Source(Protocol):
    """A picklable description of a dataset; reading happens inside the Ray task."""

    kind: str
    spec: str

    def partitions(self, num_partitions: int, num_samples: int | None) -> list[Partition]: ...

    def read(self, partition: Partition) -> Iterator[tuple[int, Sample | Rejected]]:
        """``(index, record)`` pairs; ``index`` is stable across reruns and names the sample's key."""
        ...

    def lineage(self) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]:
        """Facts about the data for the stages that train on it (recorded as ``Manifest.source_info``)."""
        ...


def split_evenly(items: list[Any], num_partitions: int) -> list[tuple[Any, ...]]:
    """Contiguous, near-equal, non-empty chunks (fewer than asked when there are fewer items)."""
    count = max(1, min(num_partitions, len(items)))
    bounds = np.linspace(0, len(items), count + 1).round().astype(int)
    return [tuple(items[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def range_partitions(num_samples: int, num_partitions: int) -> list[Partition]:
    """Index ranges ``(start, stop)`` for generated sources, where sample ``i`` depends only on ``i``."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    count = max(1, min(num_partitions, num_samples))
    bounds = np.linspace(0, num_samples, count + 1).round().astype(int)
    return [Partition(p, (int(lo), int(hi))) for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
