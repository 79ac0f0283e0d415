"""``tessera inspect``: stream one epoch of a dataset through the training loader and report on it.

Proves the dataset trains before a GPU is spent on it: every sample decodes and arrives exactly once
(the delivered count must equal the manifest's), the throughput of one loader process, and a grid of
the first batch with its captions, all logged to MLflow beside the manifest's own statistics.
"""

from __future__ import annotations

import argparse
import json
import time

from cluster.cli import add_common_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="one loader epoch over a dataset: counts, rate, sample grid"
    )
    add_common_args(parser, default_run_dir="runs/inspect")
    parser.add_argument("--manifest", required=True, help="manifest.json URL or the dataset folder")
    parser.add_argument("--tokenizer", help="tokenizer.json URL, to check captions tokenize")
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(func=main)


def read_one_epoch(args: argparse.Namespace) -> dict[str, float]:
    from data_pipeline.loader import open_loader
    from data_pipeline.manifest import load_manifest
    from trainer.tracking import Tracker

    manifest = load_manifest(args.manifest)
    text = {"tokenizer": args.tokenizer, "text_len": args.text_len} if args.tokenizer else {}
    loader = open_loader(manifest, rank=0, world_size=1, batch_size=args.batch_size, seed=0, **text)
    start, samples, first = time.perf_counter(), 0, None
    for batch in loader:
        samples += int(batch["valid"].sum())
        first = first if first is not None else batch
    seconds = time.perf_counter() - start
    stats = {"loader_samples": samples, "loader_samples_per_s": samples / seconds, "loader_seconds": seconds}
    with Tracker("tessera-data", "inspect", run_dir=args.run_dir) as tracker:
        tracker.log_params(
            {
                "manifest": args.manifest,
                "manifest_sha256": manifest.sha256(),
                "data_content_id": manifest.content_id(),
            }
        )
        tracker.log_metrics(
            {
                "num_samples": manifest.num_samples,
                "num_shards": len(manifest.shards),
                "total_bytes": manifest.total_bytes,
                "duplicates_dropped": manifest.duplicates_dropped,
                **{f"rejects_{reason}": count for reason, count in manifest.rejects.items()},
                **stats,
            },
            step=0,
        )
        tracker.log_image_grid(first["image"][:32], "samples/loader_batch.png", nrow=8)
        tracker.log_text("\n".join(first["caption"][:32]), "samples/loader_batch_captions.txt")
        tracker.log_dict(manifest.model_dump(mode="json"), "data/manifest.json")
    if samples != manifest.num_samples:
        raise RuntimeError(f"loader delivered {samples} samples, manifest holds {manifest.num_samples}")
    return stats


def main(args: argparse.Namespace) -> int:
    print(json.dumps(read_one_epoch(args), indent=2))
    return 0
