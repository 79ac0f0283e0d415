"""``tessera verify --manifest URL``: check every shard of a dataset against its manifest, on Ray."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cluster.cli import add_common_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a dataset's shards (presence, size, sha256) against its manifest",
        description="One listing for presence and size, then every shard's sha256 in parallel Ray tasks. "
        "Writes verify-report.json to the run folder; exits 1 when any shard fails.",
    )
    add_common_args(parser, default_run_dir="runs/verify")
    parser.add_argument("--manifest", required=True, help="manifest.json URL or the dataset folder")
    parser.set_defaults(func=main)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.runtime import init_ray
    from data_pipeline.manifest import load_manifest
    from data_pipeline.verify import verify_manifest

    manifest = load_manifest(args.manifest)
    init_ray(args.ray_address)
    report = verify_manifest(manifest)
    os.makedirs(args.run_dir, exist_ok=True)
    (Path(args.run_dir) / "verify-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0
