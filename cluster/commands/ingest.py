"""``tessera ingest``: build WebDataset shards + a manifest from a source, on Ray (tiny ones in-process)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cluster.cli import add_common_args
from cluster.config import apply_overrides, read_toml, validate
from data_pipeline.prep_config import DataPrepConfig, IngestConfig

# Starting a local Ray and its workers (each importing the image and tar stack) costs seconds of CPU;
# below this many samples one process finishes first even on many cores (see bench/ingest.py).
IN_PROCESS_MAX_SAMPLES = 1000


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
    parser.add_argument(
        "--in-process",
        choices=("auto", "yes", "no"),
        default="auto",
        help=f"run the partitions in this process, without Ray (auto: yes for a local ingest of at most "
        f"{IN_PROCESS_MAX_SAMPLES} samples or one partition, where starting Ray costs more than it saves)",
    )
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


def runs_in_process(config: IngestConfig, choice: str, ray_address: str) -> bool:
    """Whether the ingest skips Ray: as asked, else when it is local and tiny (a cluster address
    given with --ray-address always gets Ray)."""
    if choice != "auto":
        return choice == "yes"
    few = config.num_samples is not None and config.num_samples <= IN_PROCESS_MAX_SAMPLES
    tiny = config.partitions == 1 or few
    return ray_address == "local" and tiny


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the ingest and return its summary (the demo logs it to MLflow)."""
    from cluster.preflight import check_ingest_paths
    from cluster.runtime import init_ray
    from data_pipeline.ingest import ingest_config

    config = load(args).ingest
    check_ingest_paths(config)  # seconds, before Ray starts
    in_process = runs_in_process(config, args.in_process, args.ray_address)
    if not in_process:
        init_ray(args.ray_address)
    manifest = ingest_config(config, in_process=in_process)
    summary = manifest.summary()
    os.makedirs(args.run_dir, exist_ok=True)
    (Path(args.run_dir) / "ingest-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: argparse.Namespace) -> int:
    print(json.dumps(run(args), indent=2))
    return 0
