"""Benchmark: whole-prompt alignment with and without reranking (N samples per prompt, the judge's best kept).

For the first ``--samples`` captions of each eval manifest (seen and held-out colour/shape pairs) the
DALL-E checkpoint draws ``--n`` candidates per caption (one seeded draw, ``trainer.rerank``); the evals
judge scores each (``tessera sample --rerank``'s scorer, ``evals.alignment.alignment_score``)
and the best of the first N is kept, for N = 1, 2, 4, ... up to ``--n`` (N=1 is plain sampling). The kept
images' whole-prompt alignment is scored as ``tessera eval run`` scores it (the judge, refused below its
bar, with its verdict scope), with Wilson 95% intervals. The judge both picks and grades, as CLIP picked
and humans graded in the paper only in part: the reranked figure is the judge's view (its held-out
accuracy bounds how far the two can part). Writes ``bench/results/rerank.json``. After ``make demo``::

    .venv/bin/python bench/rerank.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/rerank.py` imports its sibling bench.alignment_report

from bench.alignment_report import print_prompt_alignment, run_header  # noqa: E402
from cluster.commands.rlhf import JudgeLabeller  # noqa: E402
from data_pipeline.tokenizer import iter_captions, load_tokenizer  # noqa: E402
from evals.alignment import alignment, parse_caption  # noqa: E402
from evals.judge import judge_images, read_card  # noqa: E402
from evals.run import judge_verdict_scope  # noqa: E402
from trainer.inference import checkpoint_or_newest, load_frozen_dvae, load_trained  # noqa: E402
from trainer.rerank import Candidates, draw_ranked  # noqa: E402
from trainer.sampling import SamplingConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dalle", default="runs/dalle-tiny/checkpoints", help="checkpoint or run folder")
    parser.add_argument("--dvae", default="runs/dvae-tiny/checkpoints")
    parser.add_argument("--tokenizer", default="runs/data/synthetic-32/tokenizer.json")
    parser.add_argument("--judge", default="runs/judge-tiny/checkpoints")
    parser.add_argument("--judge-config", default="configs/judge/tiny.toml")
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="MANIFEST",
        help="default: runs/data/eval-{seen,heldout}",
    )
    parser.add_argument("--samples", type=int, default=64, help="captions per eval manifest")
    parser.add_argument("--n", type=int, default=8, help="candidates per caption (the largest N reported)")
    parser.add_argument("--chunk", type=int, default=32, help="captions per sampler call")
    # configs/eval/tiny.toml's [dalle.sampling]
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=1.5)  # configs/eval/tiny.toml
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerank.json")
    return parser.parse_args(argv)


def shown(url: str) -> str:
    """A checkpoint URL as the report shows it: relative to the repository when it lies inside it."""
    path = Path(url)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else url


def reported_ns(largest: int) -> list[int]:
    """1, 2, 4, ... and ``largest`` itself."""
    return sorted({2**k for k in range(largest.bit_length()) if 2**k <= largest} | {largest})


def draw_all(model, dvae, tokenizer, captions, sampling, n, labeller, chunk) -> Candidates:
    """Candidates for every caption, ``chunk`` captions per draw (each chunk on its own seed)."""
    parts = [
        draw_ranked(
            model,
            dvae,
            tokenizer,
            captions[start : start + chunk],
            sampling.model_copy(update={"seed": sampling.seed + number}),
            n,
            labeller,
        )
        for number, start in enumerate(range(0, len(captions), chunk))
    ]
    return Candidates(
        captions,
        *(torch.cat([getattr(part, name) for part in parts]) for name in ("codes", "images", "scores")),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    evals = args.eval or ["runs/data/eval-seen", "runs/data/eval-heldout"]
    judge_checkpoint = checkpoint_or_newest(args.judge)
    scope, scope_notes = judge_verdict_scope(read_card(judge_checkpoint))  # as `tessera eval run` decides
    labeller = JudgeLabeller(judge_checkpoint, args.judge_config)
    dalle_checkpoint, dvae_checkpoint = checkpoint_or_newest(args.dalle), checkpoint_or_newest(args.dvae)
    model, dvae = load_trained(dalle_checkpoint), load_frozen_dvae(dvae_checkpoint)
    tokenizer = load_tokenizer(args.tokenizer)
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance, seed=args.seed
    )
    captions = [c for manifest in evals for c in itertools.islice(iter_captions(manifest), args.samples)]
    candidates = draw_all(model, dvae, tokenizer, captions, sampling, args.n, labeller, args.chunk)
    heldout = torch.tensor([parse_caption(caption).heldout for caption in captions])
    groups = {"seen": ~heldout, "heldout": heldout}
    results = {}
    for n in reported_ns(args.n):
        images, _ = candidates.best(n)
        verdicts = judge_images(labeller.judge, images)
        kept_scores = candidates.scores[:, :n].max(dim=1).values
        results[str(n)] = {
            "alignment": alignment(captions, verdicts.scenes, verdicts.digits, **scope),
            "mean_kept_score": {
                g: float(kept_scores[rows].mean()) for g, rows in groups.items() if rows.any()
            },
        }
    print_prompt_alignment(
        results, "N", "kept score", lambda result, group: f"{result['mean_kept_score'][group]:.3f}"
    )
    report = {
        **run_header("rerank"),
        "sampling": sampling.model_dump(),
        "candidates_per_caption": args.n,
        "eval_manifests": evals,
        "captions_per_manifest": args.samples,
        "dalle": shown(dalle_checkpoint),
        "dvae": shown(dvae_checkpoint),
        "judge": shown(judge_checkpoint),
        "judge_scope_notes": scope_notes,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
