"""``tessera eval index|contamination|run``: contamination index and check, and model evaluation."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cluster.cli import add_common_args
from cluster.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="contamination index/check and model evals (docs/evals.md)")
    actions = parser.add_subparsers(dest="eval_command", required=True, metavar="ACTION")

    index = actions.add_parser("index", help="build (or extend) a manifest's contamination index, on Ray")
    add_common_args(index, default_run_dir="runs/eval")
    index.add_argument("--manifest", required=True, help="dataset folder or manifest.json URL")
    index.add_argument(
        "--judge", help="judge checkpoint (or its run's checkpoint folder): adds judge features"
    )
    index.add_argument("--strict", action="store_true", help="fail on the first undecodable sample")
    index.set_defaults(func=run_index)

    contamination = actions.add_parser("contamination", help="check an eval manifest against a training one")
    add_common_args(contamination, default_run_dir="runs/eval")
    contamination.add_argument("--train", required=True, help="training manifest URL")
    contamination.add_argument("--eval", required=True, dest="eval_manifest", help="eval manifest URL")
    contamination.add_argument("--out", help="write the JSON report here (local path or URL)")
    contamination.add_argument("--judge", help="judge checkpoint: adds the judge-feature method")
    contamination.add_argument("--strict", action="store_true", help="fail on the first undecodable sample")
    contamination.set_defaults(func=run_contamination)

    evaluate = actions.add_parser("run", help="evaluate dVAE/DALL-E checkpoints (contamination report first)")
    add_common_args(evaluate, default_run_dir="runs/eval")
    evaluate.set_defaults(func=run_eval)


def _judge_spec(checkpoint: str | None) -> dict | None:
    """The judge's config and weights for the index's feature tasks (its card is checked first)."""
    if checkpoint is None:
        return None
    from evals.judge import JudgeModelConfig, load_judge, read_card
    from trainer.inference import checkpoint_or_newest

    url = checkpoint_or_newest(checkpoint)
    model = JudgeModelConfig.model_validate(read_card(url)["model"])
    judge = load_judge(url, model, required=[])  # features need no accuracy bar; verdicts do
    return {"model": model.model_dump(mode="json"), "state": judge.state_dict()}


def _settings(args: argparse.Namespace):
    """Index and check settings from an eval config (``--config``), else the defaults."""
    from evals.config import EvalConfig
    from evals.contamination import CheckSettings
    from evals.index import IndexSettings

    if args.config:
        config = load_config(EvalConfig, args.config, args.overrides)
        return config.index, config.contamination
    return IndexSettings(), CheckSettings()


def run_index(args: argparse.Namespace) -> int:
    from cluster.runtime import init_ray
    from evals.index import build_index

    settings, _ = _settings(args)
    init_ray(args.ray_address)
    meta = build_index(args.manifest, settings, judge_spec=_judge_spec(args.judge), strict=args.strict)
    print(json.dumps({k: v for k, v in meta.items() if k != "shards"}, indent=2))
    return 0


def run_contamination(args: argparse.Namespace) -> int:
    from cluster.runtime import init_ray
    from data_pipeline import storage
    from evals.contamination import check, format_table
    from evals.index import build_index, load_index

    settings, check_settings = _settings(args)
    init_ray(args.ray_address)
    spec = _judge_spec(args.judge)
    build_index(args.train, settings, judge_spec=spec)
    build_index(args.eval_manifest, settings, judge_spec=spec, strict=args.strict)
    report = check(load_index(args.train)[0], load_index(args.eval_manifest)[0], check_settings)
    report.update(train=args.train, eval=args.eval_manifest)
    if args.out:
        storage.write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(format_table(report))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from cluster.runtime import init_ray
    from evals.config import EvalConfig
    from evals.judge import load_judge, read_card
    from evals.judge_stage import JudgeStageConfig
    from evals.report import log_report
    from evals.run import evaluate, generators_of, read_train_images, training_lineage
    from trainer.inference import checkpoint_or_newest
    from trainer.tracking import Tracker

    if not args.config:
        raise SystemExit("tessera eval run: --config is required (e.g. configs/eval/tiny.toml)")
    config = load_config(EvalConfig, args.config, args.overrides)
    init_ray(args.ray_address)
    judge_url = checkpoint_or_newest(config.judge.checkpoint)
    card = read_card(judge_url)
    # A judge from another config is refused here, naming the mismatch; its accuracy bar is applied
    # to verdicts in evals.run (features for FID/KID need no bar).
    judge = load_judge(judge_url, load_config(JudgeStageConfig, config.judge.config).model, required=[])
    lineage = {
        **training_lineage(config.data.train_manifest),
        "judge_checkpoint": judge_url,
        **{
            f"{name}_checkpoint": checkpoint_or_newest(ref.checkpoint)
            for name, ref in (("dvae", config.dvae), ("dalle", config.dalle))
            if ref
        },
    }
    report, visuals = evaluate(
        config, judge, card, generators_of(config), read_train_images(config.data.train_manifest)
    )
    report["lineage"] = lineage
    os.makedirs(args.run_dir, exist_ok=True)
    (Path(args.run_dir) / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    with Tracker(
        config.run.experiment, config.run.name, run_dir=args.run_dir, tags={"stage": "eval"}
    ) as tracker:
        tracker.log_params(config.model_dump(mode="json"))
        log_report(tracker, report, visuals, lineage)
        print(f"MLflow run {tracker.run_id}; report in {args.run_dir}/report.json")
    return 0
