"""``tessera ingest``: build WebDataset shards + a manifest from a source, on Ray."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cluster.cli import add_common_args
from cluster.config import apply_overrides, read_toml, validate
from data_pipeline.prep_config import DataPrepConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="ingest a source into WebDataset shards + manifest.json",
        description="Read a source in parallel Ray tasks, validate, resize, dedup, shard; resumable.",
    )
    add_common_args(parser)
    parser.add_argument("--source", help='"synthetic", "digits", or a folder / *.tar / *.parquet path or URL')
    parser.add_argument("--dest", help="dataset URL: a local folder or s3://bucket/prefix")
    parser.add_argument("--num-samples", type=_count, help='samples to take, or "all" (external sources)')
    parser.add_argument("--image-size", type=int, help="output side in pixels (resize + centre crop)")
    parser.add_argument("--split", choices=("train", "heldout"), help="synthetic only: held-out combinations")
    parser.add_argument("--partitions", type=int, help="parallel read units (one Ray task each)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strict", action="store_true", default=None, help="fail on the first bad record")
    parser.set_defaults(func=main)


def _count(text: str) -> int | str:
    return text if text == "all" else int(text)


FLAG_FIELDS = ("source", "dest", "num_samples", "image_size", "split", "partitions", "seed", "strict")


def load(args: argparse.Namespace) -> DataPrepConfig:
    """File, then flags, then ``--set`` overrides; validated as a whole."""
    data: dict[str, Any] = read_toml(args.config) if args.config else {}
    section = data.setdefault("ingest", {})
    for name in FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            section[name] = None if value == "all" else value
    apply_overrides(data, args.overrides)
    origin = (args.config or "<defaults>") + " + command-line flags"
    return validate(DataPrepConfig, data, origin)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the ingest and return its summary (the demo logs it to MLflow)."""
    from cluster.preflight import check_ingest_paths
    from cluster.runtime import init_ray
    from data_pipeline.ingest import ingest_config

    config = load(args).ingest
    check_ingest_paths(config)  # seconds, before Ray starts
    init_ray(args.ray_address)
    manifest = ingest_config(config)
    summary = manifest.summary()
    os.makedirs(args.run_dir, exist_ok=True)
    (Path(args.run_dir) / "ingest-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: argparse.Namespace) -> int:
    print(json.dumps(run(args), indent=2))
    return 0
