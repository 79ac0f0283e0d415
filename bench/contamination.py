"""Benchmark: contamination index build and check, images/s/core, Ray tasks vs a plain Python loop.

Writes synthetic 32 px train and eval datasets (shards of ``--shard-samples``), then measures

- ``loop``: one process indexing every shard in turn (``evals.index.index_shard``, the same work
  per shard as a Ray task, no Ray) - the plain single-process baseline;
- ``ray-N``: ``evals.index.build_index`` on a local Ray cluster with N CPUs (one task per shard);
- ``check``: ``evals.contamination.check`` of the eval index against the train index;

and, on the same data, the false-positive rate of each image method on a disjoint eval split and the
catch rate of planted duplicates (exact copy, JPEG q70, 1-2 px shift, 1 px crop per side).
No judge (its features are a separate, model-bound cost). Writes ``bench/results/contamination.json``.
Usage: ``python bench/contamination.py [--train 2048] [--eval 512] [--workers 1 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.sources.base import Sample  # noqa: E402
from evals.contamination import CheckSettings, check  # noqa: E402
from evals.index import IndexSettings, ShardIndex, build_index, index_shard, load_index  # noqa: E402
from tests.evals_data import scenes, write_dataset  # noqa: E402


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


PLANTS = {
    "copy": lambda x: x,
    "jpeg70": lambda x: jpeg(x, 70),
    "shift1": lambda x: np.pad(x, ((1, 0), (1, 0), (0, 0)), mode="edge")[:32, :32],
    "shift2": lambda x: np.pad(x, ((2, 0), (2, 0), (0, 0)), mode="edge")[:32, :32],
    "crop1": lambda x: np.asarray(Image.fromarray(x[1:-1, 1:-1]).resize((32, 32), Image.BICUBIC)),
}


def loop_index(url: str, settings: IndexSettings) -> float:
    manifest = load_manifest(url)
    started = time.perf_counter()
    for shard in manifest.shards:
        index_shard(manifest.shard_url(shard), shard.num_samples, manifest.image_size, settings, None, False)
    return time.perf_counter() - started


def ray_index(url: str, settings: IndexSettings, workers: int) -> float:
    import ray

    from cluster.runtime import init_ray, shutdown_ray

    shutil.rmtree(Path(url) / "contamination-index", ignore_errors=True)
    init_ray("local", num_cpus=workers, _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    # Every worker up and its imports (numpy, PIL, imagehash, datasketch, torch) loaded before the clock
    # starts: the figure is steady-state throughput, not process start-up.
    warm = ray.remote(num_cpus=1)(lambda: __import__("evals.index") and None)
    ray.get([warm.remote() for _ in range(workers)])
    started = time.perf_counter()
    build_index(url, settings)
    seconds = time.perf_counter() - started
    shutdown_ray()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--planted", type=int, default=20, help="per kind")
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-contamination-"))
    train_samples = scenes(0, args.train)
    train = write_dataset(root / "train", train_samples, shard_samples=args.shard_samples)
    # Plants are made from the training image as stored (JPEG q95), then stored as q95 again; the copy
    # is the same source pixels through the same encoder, so its decoded pixels are identical.
    originals = [s.image for s in train_samples[: args.planted]]
    planted = [
        Sample(image=o if kind == "copy" else make(jpeg(o, 95)), caption=f"planted {kind}", metadata={})
        for kind, make in PLANTS.items()
        for o in originals
    ]
    evals = write_dataset(root / "eval", scenes(1, args.eval) + planted, shard_samples=args.shard_samples)
    settings = IndexSettings()

    rows = []
    seconds = loop_index(train, settings)
    rows.append({"mode": "loop", "cpus": 1, "images": args.train, "seconds": seconds})
    for workers in args.workers:
        seconds = ray_index(train, settings, workers)
        rows.append({"mode": f"ray-{workers}", "cpus": workers, "images": args.train, "seconds": seconds})
    from cluster.runtime import init_ray, shutdown_ray

    init_ray("local", num_cpus=max(args.workers), _temp_dir=tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    build_index(train, settings)
    build_index(evals, settings)
    shutdown_ray()
    train_index: ShardIndex = load_index(train)[0]
    eval_index: ShardIndex = load_index(evals)[0]
    started = time.perf_counter()
    report = check(train_index, eval_index, CheckSettings())
    seconds = time.perf_counter() - started
    rows.append({"mode": "check", "cpus": 1, "images": len(eval_index), "seconds": seconds})
    for row in rows:
        row["images_per_s_per_core"] = row["images"] / row["seconds"] / row["cpus"]

    disjoint = report["samples"][: args.eval]
    false_positive = {
        m: float(np.mean([m in s["flagged_by"] for s in disjoint])) for m in ("exact", "phash", "pixels")
    }
    caught = {}
    for k, kind in enumerate(PLANTS):
        chunk = report["samples"][args.eval + k * args.planted : args.eval + (k + 1) * args.planted]
        caught[kind] = {
            m: float(np.mean([m in s["flagged_by"] for s in chunk])) for m in ("exact", "phash", "pixels")
        }

    result = {
        "benchmark": "contamination",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m": os.getloadavg()[0],
        "note": args.note,
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "settings": {**settings.model_dump(), **CheckSettings().model_dump()},
        "rows": rows,
        "false_positive_rate_disjoint": false_positive,
        "planted_caught": caught,
        "train_samples": args.train,
        "eval_samples": args.eval,
    }
    print(f"{'mode':<8} {'cpus':>4} {'images':>7} {'seconds':>8} {'img/s/core':>11}")
    for row in rows:
        print(
            f"{row['mode']:<8} {row['cpus']:>4} {row['images']:>7} {row['seconds']:>8.2f} "
            f"{row['images_per_s_per_core']:>11.0f}"
        )
    print("false positives on a disjoint split:", false_positive)
    print("planted duplicates caught:", json.dumps(caught))
    out = ROOT / "bench" / "results" / "contamination.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
