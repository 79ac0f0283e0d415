"""``tessera demo``: the whole pipeline, tiny, on embedded defaults.

synthetic scenes -> Ray ingestion to WebDataset shards -> BPE tokenizer -> one loader epoch (sample
grid and ingestion stats to MLflow) -> tiny dVAE -> tiny DALL-E transformer with samples -> tiny KL
autoencoder -> tiny latent diffusion UNet with guided samples. Every step
is the same CLI command a user runs by hand; the demo only chains them and points them at one
MLflow store so the runs sit side by side in the UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cluster.cli import add_common_args
from data_pipeline.storage import join

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline, tiny, on local defaults", description=__doc__
    )
    add_common_args(parser, default_run_dir="runs/demo")
    parser.add_argument(
        "--store",
        default="runs/data",
        help="where the dataset goes: a local folder (default) or s3://bucket/prefix",
    )
    parser.add_argument("--num-samples", type=int, default=2048, help="synthetic scenes to ingest")
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="stop after the data pipeline (ingest, tokenizer, loader)",
    )
    parser.set_defaults(func=main)


def read_one_epoch(manifest_url: str, tokenizer_url: str, run_dir: str) -> dict[str, float]:
    """Stream one epoch through the loader on one rank; log a sample grid and the throughput."""
    from data_pipeline.loader import open_loader
    from data_pipeline.manifest import load_manifest
    from trainer.tracking import Tracker

    manifest = load_manifest(manifest_url)
    loader = open_loader(
        manifest, rank=0, world_size=1, batch_size=64, seed=0, tokenizer=tokenizer_url, text_len=24
    )
    start, samples, first = time.perf_counter(), 0, None
    for batch in loader:
        samples += int(batch["valid"].sum())
        first = first if first is not None else batch
    seconds = time.perf_counter() - start
    stats = {"loader_samples": samples, "loader_samples_per_s": samples / seconds, "loader_seconds": seconds}
    with Tracker("tessera-data", "demo-ingest", run_dir=run_dir) as tracker:
        tracker.log_params(
            {
                "manifest": manifest_url,
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


# (name, split, seed, samples): the judge's own train/held-out data and the models' two eval sets,
# on seeds the training set (seed 0, train split) does not use.
EVAL_DATASETS = (
    ("judge-train", "heldout", 11, 1024),
    ("judge-heldout", "heldout", 12, 256),
    ("eval-seen", "train", 1, 256),
    ("eval-heldout", "heldout", 1, 256),
)


def run_evals(step, store: str, dataset: str, tokenizer: str, common: list[str]) -> None:
    """Ingest the eval and judge sets, train the judge, then `tessera eval run` on the demo's models."""
    urls = {name: join(store, name) for name, *_ in EVAL_DATASETS}
    for name, split, seed, samples in EVAL_DATASETS:
        step(
            f"ingest {name}",
            ["ingest", "--config", "configs/ingest/tiny.toml", "--source", "synthetic", "--split", split]
            + ["--seed", str(seed), "--num-samples", str(samples), "--dest", urls[name], *common],
        )
    judge_data = ["--set", f"data.manifest={urls['judge-train']}"]
    judge_data += ["--set", f"data.validation_manifest={urls['judge-heldout']}"]
    step("train judge", ["train", "judge", "--config", "configs/judge/tiny.toml", *judge_data, *common])
    eval_sets = f'["{urls["eval-seen"]}", "{urls["eval-heldout"]}"]'
    overrides = ["--set", f"data.train_manifest={dataset}", "--set", f"data.eval_manifests={eval_sets}"]
    overrides += ["--set", f"dalle.tokenizer={tokenizer}"]
    step("eval", ["eval", "run", "--config", "configs/eval/tiny.toml", *overrides, *common])


def main(args: argparse.Namespace) -> int:
    from cluster.cli import main as tessera
    from trainer.tracking import default_tracking_uri

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    store = args.store if "://" in args.store else str(Path(args.store).resolve())
    dataset = join(store, "synthetic-32")
    tokenizer = join(dataset, "tokenizer.json")
    common = ["--ray-address", args.ray_address]
    data_overrides = ["--set", f"data.manifest={dataset}", "--set", f"data.tokenizer={tokenizer}"]
    started = time.perf_counter()

    def step(name: str, argv: list[str]) -> None:
        log.info("demo: %s", name)
        code = tessera(argv)
        if code:
            raise SystemExit(f"demo step {name!r} failed with exit code {code}")

    step(
        "ingest",
        ["ingest", "--config", "configs/ingest/tiny.toml", "--source", "synthetic"]
        + ["--num-samples", str(args.num_samples), "--dest", dataset, "--run-dir", str(run_dir / "ingest")]
        + common,
    )
    step("tokenizer", ["tokenizer", "train", "--manifest", dataset, "--vocab-size", "1024"])
    stats = read_one_epoch(dataset, tokenizer, str(run_dir))
    log.info("demo: one loader epoch: %s", json.dumps(stats))
    if not args.skip_training:
        step("train dvae", ["train", "dvae", "--config", "configs/dvae/tiny.toml", *data_overrides, *common])
        step(
            "train dalle", ["train", "dalle", "--config", "configs/dalle/tiny.toml", *data_overrides, *common]
        )
        for stage in ("autoencoder", "diffusion"):  # latent diffusion: guided samples for held-out prompts
            step(
                f"train {stage}",
                ["train", stage, "--config", f"configs/{stage}/tiny.toml", *data_overrides, *common],
            )
        run_evals(step, store, dataset, tokenizer, common)
    grids = "".join(f"\n    {path}" for path in final_grids(default_tracking_uri()))
    mlflow = Path(sys.executable).parent / "mlflow"
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s\n"
        f"  dataset:  {dataset} (manifest.json, shards, tokenizer.json)\n"
        f"  MLflow:   {mlflow} ui --backend-store-uri {default_tracking_uri()}\n"
        f"  final grids (dVAE: originals | reconstructions; DALL-E: samples above their prompts):{grids}\n"
    )
    return 0


def final_grids(tracking_uri: str) -> list[Path]:
    """The newest ``grids/step-*.png`` of every run in a local SQLite store's artifact folder."""
    if not tracking_uri.startswith("sqlite:///"):
        return []
    artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    newest: dict[Path, Path] = {}
    for path in sorted(artifacts.glob("**/artifacts/grids/step-*.png")):  # zero-padded: last = newest
        newest[path.parents[2]] = path
    return sorted(newest.values())
