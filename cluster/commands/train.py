"""``tessera train <stage>``: one training stage, in this process, under torchrun or on Ray Train."""

from __future__ import annotations

import argparse
import importlib
import json
import os

from cluster.cli import add_common_args
from cluster.config import describe_fields, load_config
from cluster.stage_inputs import resolve_stage_inputs

# Stage name -> module exposing CONFIG (its pydantic schema) and train(config) -> summary dict.
# Imported lazily: `tessera --help` must not pay for torch and DeepSpeed.
STAGES: dict[str, str] = {
    "dvae": "trainer.stages.dvae",
    "dalle": "trainer.stages.dalle",
    "autoencoder": "trainer.stages.autoencoder",
    "diffusion": "trainer.stages.diffusion",
    "judge": "evals.judge_stage",
    "reward": "trainer.stages.reward",
    "dpo": "trainer.stages.dpo",
    "ppo": "cluster.rl.ppo",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage (dvae, ...) with DeepSpeed",
        description="Train a stage from a TOML config; resumes from its newest checkpoint by default.",
    )
    parser.add_argument("stage", choices=sorted(STAGES))
    add_common_args(parser)
    parser.add_argument(
        "--launcher",
        choices=("process", "torchrun", "ray"),
        default="process",
        help="process: this process (or each rank under an outside torchrun/deepspeed launcher); "
        "torchrun: spawn --num-workers local ranks; ray: Ray Train on --ray-address",
    )
    parser.add_argument("--num-workers", type=int, default=1, help="ranks for torchrun / Ray Train")
    parser.add_argument(
        "--help-config", action="store_true", help="list every config field of the stage with its default"
    )
    # Each run gets its own folder (runs/<run.name>) unless the file or --run-dir names one: two stages
    # sharing a folder would resume from each other's checkpoints.
    parser.set_defaults(func=main, run_dir=None)


def load_stage_config(args: argparse.Namespace):
    """The stage's typed config; run folder: ``--run-dir``, else the file's, else ``runs/<run.name>``."""
    module = importlib.import_module(STAGES[args.stage])
    config = load_config(module.CONFIG, args.config, args.overrides)
    run_dir = args.run_dir or config.run.run_dir or os.path.join("runs", config.run.name)
    run = config.run.model_copy(
        update={"run_dir": _absolute(run_dir), "checkpoint_dir": _absolute(config.run.checkpoint_dir)}
    )
    data = config.data.model_copy(
        update={
            name: _absolute(getattr(config.data, name))
            for name in ("manifest", "validation_manifest", "tokenizer")
        }
    )
    return module, resolve_stage_inputs(config.model_copy(update={"run": run, "data": data}))


def _absolute(url: str | None) -> str | None:
    """Local paths made absolute: torchrun and Ray workers do not start in this directory."""
    return url if url is None or "://" in url else os.path.abspath(url)


def main(args: argparse.Namespace) -> int:
    if args.help_config:
        print("\n".join(describe_fields(importlib.import_module(STAGES[args.stage]).CONFIG)))
        return 0
    from cluster.launch import launch
    from cluster.preflight import check_training_inputs

    module, config = load_stage_config(args)
    check_training_inputs(config)  # seconds, before DeepSpeed or Ray start
    if getattr(module, "DRIVES_RAY", False):  # a driver that places its own actors (PPO)
        from cluster.runtime import init_ray

        init_ray(args.ray_address)
    summary = launch(
        module.train,
        config,
        mode=args.launcher,
        num_workers=args.num_workers,
        ray_address=args.ray_address,
        storage_path=config.run.run_dir,
        max_failures=config.run.max_failures,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0
