"""Ingest's ``image_format = "npy"``: raw uint8 pixels the loader reads without decoding, the same
samples as the JPEG ingest of the same source (within JPEG's error), and a manifest saying so."""

from __future__ import annotations

import numpy as np

from data_pipeline.ingest import ingest_config
from data_pipeline.loader import open_loader
from data_pipeline.prep_config import IngestConfig
from data_pipeline.shard_reader import iter_entries


def batches(manifest_url: str) -> dict[str, np.ndarray]:
    loader = open_loader(manifest_url, rank=0, world_size=1, batch_size=8, seed=0, num_workers=0)
    return {
        key: image.permute(1, 2, 0).numpy()
        for batch in loader
        for key, image, valid in zip(batch["__key__"], batch["image"], batch["valid"].tolist())
        if valid
    }


def test_npy_shards_hold_raw_pixels_the_loader_reads_undecoded(tmp_path):
    common = dict(source="synthetic", num_samples=24, image_size=32, partitions=2, progress=False)
    jpg = ingest_config(IngestConfig(dest=str(tmp_path / "jpg"), **common), in_process=True)
    raw = ingest_config(
        IngestConfig(dest=str(tmp_path / "npy"), image_format="npy", **common), in_process=True
    )
    assert jpg.image_format == "jpg" and raw.image_format == "npy" and raw.num_samples == 24
    [(_, members)] = list(iter_entries(raw.shard_url(raw.shards[0]), [(0, 1)]))
    assert set(members) - {"__key__"} == {"npy", "txt", "json"}
    decoded, pixels = batches(jpg.location), batches(raw.location)
    assert decoded.keys() == pixels.keys()
    for key, image in pixels.items():
        # JPEG at quality 95 on flat synthetic scenes: mean error ~1 level; 4 leaves room for edges.
        assert np.abs(image.astype(np.float64) - decoded[key]).mean() < 4, key
