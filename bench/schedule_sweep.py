"""Benchmark: a stage preset against variants of it, each trained through the real Engine and judged.

Why: choosing a tiny preset's LR or size by "loss went down" says nothing about whether the model does
its job, and running the whole stage per variant (loader, checkpoints, MLflow) costs minutes each. Here
every variant is the stage's own model, loss function and ``Engine`` (ZeRO-0 fp32, a world of one per
process, one torch thread each, ``--parallel`` at once) trained on in-memory synthetic scenes (the
stream ``tessera ingest --source synthetic`` writes, without its JPEG step), then read back by the evals
judge on the eval manifests:

- ``--stage dvae``: PSNR of hard-code reconstructions, codes in use, judge alignment of reconstructions;
- ``--stage dalle``: judge alignment of samples (the preset's ``[dalle.sampling]``) for the eval captions
  and the mean ``alignment_score``, on codes of ``--dvae``.

Writes ``bench/results/<stage>_schedule.json``. Example (after ``make demo``)::

    .venv/bin/python bench/schedule_sweep.py --stage dvae --variant "lr 8e-3=engine.lr=8e-3"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/schedule_sweep.py` imports its sibling bench.alignment_report

from bench.alignment_report import run_header  # noqa: E402
from bench.rerank import shown  # noqa: E402

ATTRIBUTES = ("colour", "shape", "size", "count", "relation", "prompt")
DEFAULT_CONFIG = {"dvae": "configs/dvae/tiny.toml", "dalle": "configs/dalle/tiny.toml"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(DEFAULT_CONFIG), required=True)
    parser.add_argument("--config", help="the preset (default configs/<stage>/tiny.toml)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FIELD=VALUE[;FIELD=VALUE...]",
        help="repeatable; the preset itself always runs as 'preset'; scenes=N sets the training scenes",
    )
    parser.add_argument("--train", type=int, default=2048, help="training scenes (seed 0, split train)")
    parser.add_argument("--dvae", default="runs/dvae-tiny/checkpoints", help="--stage dalle: the codes' dVAE")
    parser.add_argument("--tokenizer", default="runs/data/synthetic-32/tokenizer.json")
    parser.add_argument("--judge", default="runs/judge-tiny/checkpoints")
    parser.add_argument("--judge-config", default="configs/judge/tiny.toml")
    parser.add_argument("--eval", action="append", default=[], help="default: runs/data/eval-{seen,heldout}")
    parser.add_argument("--samples", type=int, default=256, help="captions per eval manifest")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, fields = text.partition("=")
    if not fields:
        raise SystemExit(f"--variant {text!r}: expected NAME=FIELD=VALUE[;FIELD=VALUE...]")
    return name, fields.split(";")


def scenes(count: int) -> tuple[torch.Tensor, list[str]]:
    from data_pipeline.sources.synthetic import generate_scene

    drawn = [generate_scene(0, index, image_size=32) for index in range(count)]
    images = torch.from_numpy(np.stack([scene.image for scene in drawn])).permute(0, 3, 1, 2)
    return images.float() / 255.0, [scene.caption for scene in drawn]


def judged(args: argparse.Namespace, images_by_split: dict[str, tuple[list[str], torch.Tensor]]) -> dict:
    """Per split: judge-read accuracy per attribute (Wilson intervals) and the mean alignment score."""
    from cluster.commands.rlhf import JudgeLabeller
    from evals.alignment import alignment, alignment_score, parse_caption
    from evals.judge import judge_images

    labeller = JudgeLabeller(args.judge, args.judge_config)
    small_shapes = labeller.small_shapes
    report = {}
    for split, (captions, images) in images_by_split.items():
        verdicts = judge_images(labeller.judge, images)
        group = alignment(captions, verdicts.scenes, verdicts.digits, small_shapes=small_shapes)["all"]
        report[split] = {name: group[name] for name in ATTRIBUTES if name in group}
        # The labeller's score, from the verdicts already read (not a second judge pass).
        report[split]["score"] = float(
            np.mean(
                [
                    alignment_score(parse_caption(caption), scene, digit, small_shapes=small_shapes)
                    for caption, scene, digit in zip(captions, verdicts.scenes, verdicts.digits)
                ]
            )
        )
    return report


def eval_sets(args: argparse.Namespace) -> dict[str, tuple[list[str], torch.Tensor]]:
    from evals.run import read_eval_set

    sets = {}
    for url in args.eval or ["runs/data/eval-seen", "runs/data/eval-heldout"]:
        evalset = read_eval_set(url, set(), strict=False)
        sets[Path(url).name] = (
            evalset.captions[: args.samples],
            evalset.images[: args.samples].float() / 255,
        )
    return sets


def train(engine, batches, steps: int) -> tuple[float, float]:
    """Run ``steps`` engine steps on ``batches(step)``; returns (last loss, seconds)."""
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        loss = engine.train_step(batches(step)).loss
        if (step + 1) % max(1, steps // 5) == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"  step {step + 1}/{steps} loss {loss:.4f} ({rate:.1f} steps/s)", flush=True)
    return loss, time.perf_counter() - start


def run_dvae(args: argparse.Namespace, config) -> dict:
    from trainer.engine import Engine
    from trainer.losses.vae import codebook_usage, psnr
    from trainer.models import build
    from trainer.stages.dvae import init_batch_size, make_loss

    images, _ = scenes(args.train)
    model = build(config.model, device="cpu")
    if config.dvae.init_logits_from_data:
        model.init_code_logits(images[: init_batch_size(config)])
    engine = Engine(model, config.engine, make_loss(config))
    draws = torch.Generator().manual_seed(config.run.seed)
    size = config.engine.micro_batch_size

    def batches(step: int) -> dict:
        chosen = torch.randint(len(images), (size,), generator=draws)
        return {"image": images[chosen], "valid": torch.ones(size)}

    loss, seconds = train(engine, batches, config.engine.total_steps)
    module = engine.module.eval()
    evals = eval_sets(args)
    row: dict = {"loss": loss, "train_seconds": seconds, "splits": {}}
    reconstructions = {}
    with torch.no_grad():
        for split, (captions, originals) in evals.items():
            codes = module.encode(originals)
            rebuilt = module.decode(codes).float().clamp(0, 1)
            _, dead = codebook_usage(codes, config.model.vocab_size)
            row["splits"][split] = {"psnr": float(psnr(originals, rebuilt).mean()), "codes_used": 1 - dead}
            reconstructions[split] = (captions, rebuilt)
    for split, scores in judged(args, reconstructions).items():
        row["splits"][split]["alignment"] = scores
    return row


def run_dalle(args: argparse.Namespace, config) -> dict:
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.engine import Engine
    from trainer.inference import checkpoint_or_newest, load_frozen_dvae
    from trainer.models import build
    from trainer.sampling import generate_codes
    from trainer.stages.dalle import make_loss_fn

    dvae = load_frozen_dvae(checkpoint_or_newest(args.dvae))
    tokenizer = load_tokenizer(args.tokenizer)
    images, captions = scenes(args.train)
    with torch.no_grad():
        codes = torch.cat([dvae.encode(images[i : i + 256]).flatten(1) for i in range(0, len(images), 256)])
    text = tokenizer.encode_batch(captions, config.model.text_len)
    model = build(config.model, device="cpu")
    settings = config.dalle
    loss_fn = make_loss_fn(config.model, text_weight=settings.text_weight, image_weight=settings.image_weight)
    engine = Engine(model, config.engine, loss_fn)
    draws = torch.Generator().manual_seed(config.run.seed)
    size = config.engine.micro_batch_size

    def batches(step: int) -> dict:
        chosen = torch.randint(len(codes), (size,), generator=draws)
        batch_text = text[chosen].clone()
        batch_text[torch.rand(size, generator=draws) < settings.caption_dropout] = config.model.text_pad_id
        return {"text": batch_text, "codes": codes[chosen], "valid": torch.ones(size)}

    loss, seconds = train(engine, batches, config.engine.total_steps)
    module = engine.module.eval()
    side = config.model.image_side
    samples = {}
    with torch.no_grad():
        for split, (eval_captions, _) in eval_sets(args).items():
            prompts = tokenizer.encode_batch(eval_captions, config.model.text_len)
            drawn = generate_codes(module, prompts, settings.sampling, torch.Generator().manual_seed(0))
            samples[split] = (eval_captions, dvae.decode(drawn.view(-1, side, side)).float().clamp(0, 1))
    splits = {split: {"alignment": scores} for split, scores in judged(args, samples).items()}
    return {"loss": loss, "train_seconds": seconds, "splits": splits}


def run_variant(job: tuple[argparse.Namespace, str, list[str]]) -> tuple[str, dict]:
    args, name, overrides = job
    torch.set_num_threads(1)
    from cluster.config import load_config
    from trainer.stages.dalle import DalleStageConfig
    from trainer.stages.dvae import DVAEStageConfig

    schema = {"dvae": DVAEStageConfig, "dalle": DalleStageConfig}[args.stage]
    scenes_override = [item for item in overrides if item.startswith("scenes=")]
    if scenes_override:
        args = argparse.Namespace(**{**vars(args), "train": int(scenes_override[-1].split("=", 1)[1])})
    config = load_config(schema, args.config, [item for item in overrides if item not in scenes_override])
    torch.manual_seed(config.run.seed)
    print(f"{name}: {overrides or 'the preset'}", flush=True)
    row = (run_dvae if args.stage == "dvae" else run_dalle)(args, config)
    return name, {"overrides": overrides, "train_scenes": args.train, **row}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.config = args.config or DEFAULT_CONFIG[args.stage]
    jobs = [(args, "preset", [])] + [(args, *parse_variant(text)) for text in args.variant]
    context = multiprocessing.get_context("spawn")  # a fresh world of one (and torch) per variant
    with context.Pool(args.parallel, maxtasksperchild=1) as pool:
        rows = dict(pool.map(run_variant, jobs, chunksize=1))
    report = {
        **run_header(f"{args.stage}_schedule"),
        "preset": args.config,
        "train_scenes": args.train,
        "eval_samples": args.samples,
        "parallel": args.parallel,
        "judge": shown(args.judge),
        **({"dvae": shown(args.dvae)} if args.stage == "dalle" else {}),
        "variants": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"{args.stage}_schedule.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'variant':28s} {'split':12s} {'psnr':>6s} "
        + " ".join(f"{a:>8s}" for a in ATTRIBUTES)
        + "    score"
    )
    for name, row in rows.items():
        for split, cell in row["splits"].items():
            accuracy = " ".join(
                f"{cell['alignment'][a]['accuracy']:8.3f}" if a in cell["alignment"] else " " * 8
                for a in ATTRIBUTES
            )
            psnr_text = f"{cell['psnr']:6.2f}" if "psnr" in cell else "     -"
            print(f"{name:28s} {split:12s} {psnr_text} {accuracy} {cell['alignment']['score']:8.3f}")
    return report


if __name__ == "__main__":
    main()
