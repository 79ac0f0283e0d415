"""Benchmark: how well the loader mixes samples on the tiny set, sample-level shuffle vs tar order.

For each world size and window (shards a rank mixes at a time), from the loader's plan: mean distinct
shards per batch of 64, and Spearman rho between delivery position and (a) tar position (the dataset's
shards in manifest order, front to back), (b) the position a loader streaming the epoch's shards
front to back (``shuffle=False``, the v1 loader) delivers the same sample at. One row (rank 0, world
size 1, the default window) is also measured from the real loader's delivered keys, which confirms
the plan is what the loader delivers. Targets (issue 16): |rho| <= 0.05, distinct shards per batch
>= min(8, shards in the window). No timing: these figures do not depend on the machine.

The tiny set is ``configs/ingest/tiny.toml`` (2,048 synthetic 32 px samples), ingested in-process into
a temporary folder unless ``--manifest`` names an existing dataset. Writes
``bench/results/shuffle_quality.json``. Usage: ``python bench/shuffle_quality.py [--manifest URL]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import tomllib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from data_pipeline.ingest import ingest_config  # noqa: E402
from data_pipeline.loader import DEFAULT_WINDOW_SHARDS, open_loader  # noqa: E402
from data_pipeline.manifest import Manifest, load_manifest  # noqa: E402
from data_pipeline.prep_config import IngestConfig  # noqa: E402
from data_pipeline.shard_reader import read_shard  # noqa: E402
from data_pipeline.shuffle_quality import plan_quality, spearman_rho  # noqa: E402
from data_pipeline.tar_index import build_index  # noqa: E402

BATCH = 64
WORLD_SIZES = (1, 2, 4)
WINDOWS = (4, 8, DEFAULT_WINDOW_SHARDS)


def tiny_set(dest: str) -> Manifest:
    settings = tomllib.loads((ROOT / "configs/ingest/tiny.toml").read_text())["ingest"]
    return ingest_config(IngestConfig(**{**settings, "dest": dest, "progress": False}), in_process=True)


def measured_from_loader(manifest: Manifest) -> dict:
    """Rank 0 of 1, default window: the same figures from the keys the loader really delivered."""
    position = {}
    offset = 0
    for shard, entry in enumerate(manifest.shards):
        url = manifest.shard_url(entry)
        for i, indexed in enumerate(build_index(read_shard(url), entry.sha256).entries):
            position[(url, indexed.key)] = (shard, offset + i)
        offset += entry.num_samples
    loader = open_loader(manifest, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=0)
    distinct, tar_positions = [], []
    for batch in loader:
        rows = [position[(u, k)] for u, k, v in zip(batch["__url__"], batch["__key__"], batch["valid"]) if v]
        if len(rows) == BATCH:
            distinct.append(len({shard for shard, _ in rows}))
        tar_positions += [p for _, p in rows]
    return {
        "mean_distinct_shards_per_batch": float(np.mean(distinct)),
        "spearman_rho": spearman_rho(np.arange(len(tar_positions)), np.array(tar_positions)),
        "samples": len(tar_positions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", help="an existing dataset (default: ingest the tiny set to a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/shuffle_quality.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(args.manifest) if args.manifest else tiny_set(os.path.join(tmp, "tiny"))
        counts = [entry.num_samples for entry in manifest.shards]
        rows = [
            plan_quality(counts, batch_size=BATCH, world_size=w, window_shards=k, shuffle=shuffle)
            for w in WORLD_SIZES
            for k in WINDOWS
            for shuffle in (True, False)
            if shuffle or k == WINDOWS[-1]
        ]
        loader = measured_from_loader(manifest)
    print(f"{len(counts)} shards, {sum(counts)} samples, batch {BATCH}")
    print(
        "| world | window | shuffle | shards/window | distinct/batch (target) | uniform | rho tar "
        "| rho vs stream |"
    )
    for row in rows:
        print(
            f"| {row['world_size']} | {row['window_shards']} | {row['shuffle']} "
            f"| {row['shards_per_window_max']} | {row['mean_distinct_shards_per_batch']:.2f} "
            f"({row['mean_distinct_target']:.2f}) | {row['mean_distinct_uniform']:.2f} "
            f"| {row['spearman_rho']:+.3f} | {row['spearman_rho_vs_streaming']:+.3f} |"
        )
    print(f"real loader (world 1, window {DEFAULT_WINDOW_SHARDS}): {json.dumps(loader)}")
    result = {
        "benchmark": "shuffle_quality",
        "command": " ".join(["python", "bench/shuffle_quality.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no timings)",
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "dataset": {
            "manifest": args.manifest or "configs/ingest/tiny.toml (in-process)",
            "shard_samples": counts,
        },
        "batch_size": BATCH,
        "targets": {"abs_rho_max": 0.05, "distinct_shards_per_batch_min": "min(8, shards in window)"},
        "plan": rows,
        "loader_measured": loader,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
