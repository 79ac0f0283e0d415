"""``tessera demo``: the whole pipeline, tiny, on embedded defaults — ``tessera pipeline --preset demo``.

synthetic scenes -> Ray ingestion to WebDataset shards -> BPE tokenizer -> one loader epoch (sample
grid and ingestion stats) -> tiny dVAE -> tiny DALL-E transformer with samples; tiny KL autoencoder ->
latent diffusion with guided samples; the evals judge -> `tessera eval run` (contamination, alignment,
FID/KID, memorisation); preference pairs -> reward model -> PPO, and DPO. The graph is
``configs/pipeline/demo.toml``: every stage is the CLI command a user runs by hand, run on Ray with its
dependencies done, skipped when an identical run already finished (a second demo takes seconds). Every
run lands in the working directory's MLflow store, so the runs sit side by side in the UI.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cluster.cli import add_common_args
from data_pipeline.storage import join

log = logging.getLogger(__name__)
DATA_STAGES = ["ingest", "tokenizer", "inspect"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline, tiny, on local defaults", description=__doc__
    )
    add_common_args(parser, default_run_dir="runs/demo")
    parser.add_argument(
        "--store",
        default="runs/data",
        help="where the datasets go: a local folder (default) or s3://bucket/prefix",
    )
    parser.add_argument("--num-samples", type=int, default=8192, help="synthetic scenes to train on")
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help=f"stop after the data stages ({', '.join(DATA_STAGES)})",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import ray

    from cluster.pipeline import load_preset, run
    from cluster.runtime import init_ray
    from trainer.tracking import default_tracking_uri

    run_dir = Path(args.run_dir).resolve()
    store = args.store if "://" in args.store else str(Path(args.store).resolve())
    variables = {"store": store, "num_samples": str(args.num_samples)}
    started = time.perf_counter()
    init_ray(args.ray_address)
    address = ray.get_runtime_context().gcs_address if args.ray_address == "local" else args.ray_address
    summary = run(
        load_preset("demo"),
        variables,
        str(run_dir),
        ray_address=address,
        only=DATA_STAGES if args.skip_training else None,
    )
    grids = "".join(f"\n    {name}: {path}" for name, path in final_grids(default_tracking_uri()))
    mlflow = Path(sys.executable).parent / "mlflow"
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s "
        f"({len(summary['ran'])} stages ran, {len(summary['skipped'])} already done)\n"
        f"  dataset:  {join(store, 'synthetic-32')} (manifest.json, shards, tokenizer.json)\n"
        f"  logs:     {run_dir / 'logs'} (one per stage)\n"
        f"  MLflow:   {mlflow} ui --backend-store-uri {default_tracking_uri()}\n"
        f"  final grids (dVAE: originals | reconstructions; DALL-E: samples above their prompts):{grids}\n"
    )
    return 0


def final_grids(tracking_uri: str) -> list[tuple[str, Path]]:
    """``(run name, newest grids/step-*.png)`` for every run in a local SQLite store's artifact folder,
    so a reader knows which grid is the dVAE's and which the DALL-E's."""
    from trainer.tracking import read_run

    if not tracking_uri.startswith("sqlite:///"):
        return []
    artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    newest: dict[str, Path] = {}
    for path in sorted(artifacts.glob("**/artifacts/grids/step-*.png")):  # zero-padded: last = newest
        newest[path.parents[2].name] = path  # .../<run id>/artifacts/grids/step-*.png
    names = {
        run_id: read_run(tracking_uri, run_id).data.tags.get("tessera.run_name", run_id) for run_id in newest
    }
    return sorted((names[run_id], path) for run_id, path in newest.items())
