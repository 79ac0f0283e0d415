"""Tiny datasets for the eval tests, written with the ingest's own ShardWriter (no Ray needed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from data_pipeline.manifest import Manifest, SourceLineage, save_manifest
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.base import Sample
from data_pipeline.sources.synthetic import generate_scene
from data_pipeline.validate import encode_jpeg

IMAGE_SIZE = 32


def scenes(seed: int, count: int, split: str = "train", start: int = 0) -> list[Sample]:
    return [generate_scene(seed, i, image_size=IMAGE_SIZE, split=split) for i in range(start, start + count)]


def write_dataset(
    dest: Path,
    samples: Iterable[Sample],
    *,
    shard_samples: int = 128,
    quality: int = 95,
    split: str = "train",
) -> str:
    """Shards + manifest at ``dest``; returns the manifest folder."""
    writer = ShardWriter(str(dest), 0, max_bytes=2**30, max_samples=shard_samples)
    for index, sample in enumerate(samples):
        image = sample.image if isinstance(sample.image, Image.Image) else Image.fromarray(sample.image)
        writer.write(
            f"sample-{index:06d}",
            {
                "jpg": encode_jpeg(image, quality),
                "txt": sample.caption.encode(),
                "json": json.dumps(sample.metadata).encode(),
            },
        )
    entries = writer.close()
    manifest = Manifest(
        source=SourceLineage(spec="synthetic", kind="synthetic", seed=0, split=split),
        image_size=IMAGE_SIZE,
        num_samples=sum(e.num_samples for e in entries),
        total_bytes=sum(e.bytes for e in entries),
        shards=entries,
    )
    save_manifest(manifest, str(dest))
    return str(dest)
