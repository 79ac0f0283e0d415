"""Benchmark: what a dVAE keeps of a scene, as PSNR, codebook use and what the evals judge reads back.

For every image of an eval manifest: the originals, 2x2-pooled copies (bilinear back to full size: a
mild softening a person reads straight through, the judge's tolerance check) and each dVAE's
reconstruction from hard codes. Each row gets PSNR against the originals, and the judge's per-attribute
and whole-prompt alignment with the captions (Wilson 95% intervals), scored as ``tessera eval run``
scores it. Writes ``bench/results/dvae_quality.json``; ``bench/report.py`` renders it into docs/dalle.md.
After ``make demo`` (and optionally ``tessera train dvae --config configs/dvae/quality.toml``)::

    .venv/bin/python bench/dvae_quality.py --dvae demo=runs/dvae-tiny/checkpoints \\
        --dvae quality=runs/dvae-quality/checkpoints
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/dvae_quality.py` imports its sibling bench.rerank

from bench.alignment_report import run_header  # noqa: E402
from bench.rerank import shown  # noqa: E402
from cluster.commands.rlhf import JudgeLabeller  # noqa: E402
from evals.alignment import alignment  # noqa: E402
from evals.judge import judge_images, read_card  # noqa: E402
from evals.run import judge_verdict_scope, read_eval_set  # noqa: E402
from trainer.inference import checkpoint_or_newest, load_frozen_dvae  # noqa: E402
from trainer.losses.vae import codebook_usage, psnr  # noqa: E402

ATTRIBUTES = ("colour", "shape", "size", "count", "position", "relation", "prompt")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dvae", action="append", default=[], metavar="NAME=CHECKPOINT", help="default: demo=runs/dvae-tiny"
    )
    parser.add_argument("--judge", default="runs/judge-tiny/checkpoints")
    parser.add_argument("--judge-config", default="configs/judge/tiny.toml")
    parser.add_argument("--eval", default="runs/data/eval-seen")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dvae_quality.json")
    return parser.parse_args(argv)


def read_back(labeller: JudgeLabeller, captions: list[str], images: torch.Tensor, originals: torch.Tensor):
    verdicts = judge_images(labeller.judge, images)
    scores = alignment(captions, verdicts.scenes, verdicts.digits, small_shapes=labeller.small_shapes)["all"]
    return {
        "psnr": float(psnr(originals, images).mean()),
        "alignment": {name: scores[name] for name in ATTRIBUTES if name in scores},
    }


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    dvaes = dict(item.split("=", 1) for item in (args.dvae or ["demo=runs/dvae-tiny/checkpoints"]))
    judge = checkpoint_or_newest(args.judge)
    labeller = JudgeLabeller(judge, args.judge_config)
    _, scope_notes = judge_verdict_scope(read_card(judge))
    evalset = read_eval_set(args.eval, set(), strict=False)
    originals = evalset.images.float() / 255.0
    pooled = F.interpolate(F.avg_pool2d(originals, 2), scale_factor=2, mode="bilinear", align_corners=False)
    rows = {
        "originals": read_back(labeller, evalset.captions, originals, originals),
        "originals 2x2-pooled": read_back(labeller, evalset.captions, pooled.clamp(0, 1), originals),
    }
    for name, url in dvaes.items():
        checkpoint = checkpoint_or_newest(url)
        dvae = load_frozen_dvae(checkpoint)
        codes = dvae.encode(originals)
        row = read_back(labeller, evalset.captions, dvae.decode(codes).float().clamp(0, 1), originals)
        perplexity, dead = codebook_usage(codes, dvae.config.vocab_size)
        row.update(
            checkpoint=shown(checkpoint),
            vocab_size=dvae.config.vocab_size,
            codes_used=1 - dead,
            perplexity=perplexity,
        )
        rows[f"dVAE {name}"] = row
    report = {
        **run_header("dvae_quality"),
        "eval_manifest": shown(args.eval),
        "eval_samples": len(evalset.captions),
        "judge": shown(judge),
        "judge_scope_notes": scope_notes,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in rows.items():
        cells = " ".join(f"{k} {v['accuracy']:.3f}" for k, v in row["alignment"].items())
        print(f"{name:24s} psnr {row['psnr']:6.2f}  {cells}")
    return report


if __name__ == "__main__":
    main()
