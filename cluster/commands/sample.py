"""``tessera sample``: draw images for prompts from a trained DALL-E checkpoint; grid to a PNG and MLflow.

Sampling settings come from ``[dalle.sampling]`` of the config; the flags override them. ``--rerank N``
draws N images per prompt and keeps the one the evals judge scores highest for prompt alignment
(``evals.alignment.alignment_score``), as DALL-E reranked with CLIP (``trainer/rerank.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cluster.cli import add_common_args
from cluster.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="draw images for prompts from a DALL-E checkpoint (KV-cache decoding, top-k/top-p, CFG)",
        description="Prompts -> image codes (KV-cache decoding) -> dVAE decode -> image grid (PNG + MLflow).",
    )
    add_common_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--checkpoint", default="auto", help='checkpoint URL; "auto": newest of the run')
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--guidance-scale", type=float, help="1 = off; >1 = classifier-free guidance")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (slow)")
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    parser.add_argument(
        "--rerank",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="draw N per prompt, keep the judge's best (1 = off)",
    )
    parser.add_argument("--judge", default="runs/judge-tiny/checkpoints", help="--rerank: judge checkpoint")
    parser.add_argument(
        "--judge-config", default="configs/judge/tiny.toml", help="--rerank: the judge's TOML"
    )
    parser.add_argument("--model", choices=("dalle", "diffusion"), default="dalle", help="which generator")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp"), help="diffusion: the sampler")
    parser.add_argument("--steps", type=int, help="diffusion: denoising steps")
    parser.add_argument("--guidance", type=float, help="diffusion: classifier-free guidance scale (1 = off)")
    parser.set_defaults(func=main)


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


SAMPLING_FLAGS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
}


def unscorable(prompts: list[str]) -> str | None:
    """Why the judge cannot score one of ``prompts`` (its caption grammar does not produce it), or None."""
    from evals.alignment import CaptionError, parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except CaptionError as exc:
        return str(exc)
    return None


def main(args: argparse.Namespace) -> int:
    if args.model == "diffusion":
        from cluster.commands.sample_diffusion import main as sample_diffusion

        return sample_diffusion(args)
    import torch
    from PIL import Image

    from cluster.stage_inputs import resolve_stage_inputs
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.inference import draw_samples, load_frozen_dvae, load_trained, resolve_checkpoint
    from trainer.stages.dalle import DalleStageConfig, check_compatible, default_prompts
    from trainer.stages.loop import checkpoint_dir_of
    from trainer.tracking import Tracker, image_grid

    overrides = list(args.overrides)
    for flag, field in SAMPLING_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"dalle.sampling.{field}={value}")
    if args.no_cache:
        overrides.append("dalle.sampling.use_cache=false")
    config = resolve_stage_inputs(load_config(DalleStageConfig, args.config, overrides))
    prompts = args.prompt or config.dalle.sample_prompts or default_prompts(config)
    if args.rerank > 1 and (problem := unscorable(prompts)):
        print(f"tessera sample: --rerank: the judge cannot score this prompt: {problem}", file=sys.stderr)
        return 2
    checkpoint = resolve_checkpoint(args.checkpoint, checkpoint_dir_of(config))
    model = load_trained(checkpoint, args.device)
    dvae = load_frozen_dvae(config.dalle.dvae_checkpoint, args.device)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_compatible(config.model_copy(update={"model": model.config}), dvae, tokenizer)
    rerank: dict = {"n": args.rerank}
    if args.rerank > 1:
        from cluster.commands.rlhf import JudgeLabeller
        from trainer.rerank import draw_ranked

        labeller = JudgeLabeller(args.judge, args.judge_config)
        candidates = draw_ranked(
            model, dvae, tokenizer, prompts, config.dalle.sampling, args.rerank, labeller
        )
        images, codes = candidates.best()
        rerank.update(kept=candidates.kept().tolist(), scores=candidates.scores.tolist())
    else:
        images, codes = draw_samples(model, dvae, tokenizer, prompts, config.dalle.sampling)

    os.makedirs(args.run_dir, exist_ok=True)
    grid_path = os.path.join(args.run_dir, "samples.png")
    Image.fromarray(image_grid(images, nrow=min(8, len(prompts)))).save(grid_path)
    torch.save(
        {"prompts": prompts, "codes": codes, "rerank": rerank}, os.path.join(args.run_dir, "samples.pt")
    )
    with Tracker(config.run.experiment, f"{config.run.name}-samples", run_dir=args.run_dir) as tracker:
        tracker.log_params(
            {
                "checkpoint": checkpoint,
                "dvae_checkpoint": config.dalle.dvae_checkpoint,
                "sampling": config.dalle.sampling.model_dump(),
                "rerank": args.rerank,
            }
        )
        tracker.log_dict({"prompts": prompts, "rerank": rerank}, "samples/prompts.json")
        tracker.log_image_grid(images, "samples/grid.png", nrow=min(8, len(prompts)))
        run_id = tracker.run_id
    print(
        json.dumps(
            {"grid": grid_path, "prompts": prompts, "rerank": rerank, "mlflow_run_id": run_id}, indent=2
        )
    )
    return 0
