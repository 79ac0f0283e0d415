"""``tessera plan``: per-GPU memory, the largest micro-batch and the step time of a DALL-E preset.

The preset (``--config``, with ``--set`` overrides) supplies the model, ZeRO stage, micro-batch,
accumulation, activation checkpointing and MoE settings; flags describe the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.cli import add_common_args
from cluster.config import load_config
from cluster.planner import PlanInputs, plan


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="will a DALL-E preset fit a cluster, and how long is a step",
        description="Model states, activations, largest micro-batch, tokens/step and step time per GPU.",
    )
    add_common_args(parser)
    defaults = PlanInputs()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--gpu-memory-gb", type=float, default=defaults.gpu_memory_gb, help="GiB per GPU")
    parser.add_argument(
        "--peak-tflops", type=float, default=defaults.peak_tflops, help="16-bit dense peak per GPU"
    )
    parser.add_argument("--mfu", type=float, default=defaults.mfu, help="assumed model FLOPs utilisation")
    parser.add_argument("--seq-len", type=int, help="default: the model's text + image sequence")
    parser.add_argument("--no-flash", action="store_true", help="attention stores its score matrix")
    parser.add_argument("--reserve-gb", type=float, default=defaults.reserve_gb, help="GiB kept free per GPU")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from trainer.stages.dalle import DalleStageConfig

    if not args.config:
        print("tessera plan: --config is required (e.g. configs/dalle/dalle-12b.toml)", file=sys.stderr)
        return 2
    with open(args.config) as handle:
        if "[diffusion]" in handle.read():  # a latent diffusion preset: sized by its own census
            return plan_diffusion(args)
    config = load_config(DalleStageConfig, args.config, args.overrides)
    inputs = plan_inputs(args, config.engine, seq_len=args.seq_len, flash_attention=not args.no_flash)
    result = plan(config.model, inputs)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0 if result.fits else 1


def plan_inputs(args: argparse.Namespace, engine, **extra) -> PlanInputs:
    """The cluster (flags) and the batch/ZeRO settings (the preset's engine) every plan starts from."""
    return PlanInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        zero_stage=engine.zero_stage,
        micro_batch=engine.micro_batch_size,
        grad_accum=engine.grad_accum,
        activation_checkpointing=engine.activation_checkpointing,
        reserve_gb=args.reserve_gb,
        **extra,
    )


def plan_diffusion(args: argparse.Namespace) -> int:
    from cluster.diffusion_plan import plan_denoiser, table
    from trainer.stages.diffusion import DiffusionStageConfig

    config = load_config(DiffusionStageConfig, args.config, args.overrides)
    inputs = plan_inputs(args, config.engine)
    result = plan_denoiser(config.model, inputs)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["fits"] else 1
