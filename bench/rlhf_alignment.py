"""Benchmark: does RLHF make the policy draw its prompt? SFT vs DPO vs PPO, judged on the same prompts.

For the first ``--samples`` captions of each eval manifest (seen and held-out colour/shape pairs), each
policy draws one image per caption with the same seeded sampler; the evals judge (refused below its
accuracy bar) scores whole-prompt alignment, with Wilson 95% intervals. Beside it: the policy's KL to
the SFT reference on its own samples (mean over images of the summed per-code log-ratio, the k1
estimate of KL(policy || SFT)), i.e. what the alignment gain cost; and, with a normal 95% interval, the
mean of the labeller's graded score (``evals.alignment.alignment_score``: what the preference pairs and
the reward model encode, so what DPO and PPO optimise). ``--guidance 1 --top-k 0`` samples as the
preference stage and PPO's rollouts do (the policy's own distribution); the default is the evals'.
Writes ``bench/results/rlhf_alignment.json``. Example (after ``make demo``)::

    .venv/bin/python bench/rlhf_alignment.py --sft runs/dalle-tiny/checkpoints \\
        --policy dpo=runs/dpo-tiny/checkpoints --policy ppo=runs/ppo-tiny/checkpoints/policy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/rlhf_alignment.py` imports its sibling bench.alignment_report

from bench.alignment_report import print_prompt_alignment, run_header  # noqa: E402
from cluster.config import load_config  # noqa: E402
from data_pipeline.tokenizer import iter_captions, load_tokenizer  # noqa: E402
from evals.alignment import alignment, alignment_score, parse_caption  # noqa: E402
from evals.judge import judge_images, load_judge, read_card  # noqa: E402
from evals.judge_stage import JudgeStageConfig  # noqa: E402
from evals.run import judge_verdict_scope  # noqa: E402
from trainer.inference import checkpoint_or_newest, load_frozen_dvae, load_trained  # noqa: E402
from trainer.rlhf.policy import image_logprobs  # noqa: E402
from trainer.sampling import SamplingConfig, generate_codes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sft", default="runs/dalle-tiny/checkpoints", help="the SFT policy (and KL reference)"
    )
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=CHECKPOINT", help="repeatable")
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
    parser.add_argument("--samples", type=int, default=128, help="captions per eval manifest")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=32, help="0: no top-k filter")
    parser.add_argument("--guidance", type=float, default=1.5)  # configs/eval/tiny.toml
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rlhf_alignment.json")
    return parser.parse_args(argv)


def first_captions(manifest: str, count: int) -> list[str]:
    captions = []
    for caption in iter_captions(manifest):
        captions.append(caption)
        if len(captions) == count:
            break
    return captions


@torch.no_grad()
def measure(
    policy,
    reference,
    dvae,
    judge,
    tokenizer,
    captions: list[str],
    sampling: SamplingConfig,
    scope: dict[str, bool],
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Judge-read alignment and KL to the SFT; per-image alignment scores, and which prompts are held out."""
    text = tokenizer.encode_batch(captions, policy.config.text_len)
    codes = generate_codes(policy, text, sampling, torch.Generator().manual_seed(sampling.seed))
    side = policy.config.image_side
    images = dvae.decode(codes.view(-1, side, side)).float().clamp(0, 1)
    verdicts = judge_images(judge, images)
    summary = alignment(captions, verdicts.scenes, verdicts.digits, **scope)
    required = [parse_caption(caption) for caption in captions]
    scores = [
        alignment_score(r, scene, d, small_shapes=scope["small_shapes"])
        for r, scene, d in zip(required, verdicts.scenes, verdicts.digits)
    ]
    kl = (image_logprobs(policy, text, codes) - image_logprobs(reference, text, codes)).sum(dim=1)
    measured = {"alignment": summary, "kl_to_sft": float(kl.mean()), "images": len(captions)}
    return measured, torch.tensor(scores, dtype=torch.float64), torch.tensor([r.heldout for r in required])


def mean_interval(values: torch.Tensor) -> dict:
    """Mean and normal 95% interval of per-image scores (or of per-caption differences: a paired test)."""
    mean, half = float(values.mean()), 1.96 * float(values.std()) / len(values) ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "total": len(values)}


def main(argv=None) -> int:
    args = parse_args(argv)
    policies = {"sft": args.sft, **dict(item.split("=", 1) for item in args.policy)}
    evals = args.eval or ["runs/data/eval-seen", "runs/data/eval-heldout"]
    judge_checkpoint = checkpoint_or_newest(args.judge)
    card = read_card(judge_checkpoint)
    scope, _ = judge_verdict_scope(card)  # which verdicts the judge is trusted with, as evals decide
    judge = load_judge(
        judge_checkpoint,
        load_config(JudgeStageConfig, args.judge_config).model,
        required=[],  # the bar was checked by judge_verdict_scope above
    )
    dvae = load_frozen_dvae(checkpoint_or_newest(args.dvae))
    tokenizer = load_tokenizer(args.tokenizer)
    reference = load_trained(checkpoint_or_newest(args.sft))
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k or None, guidance_scale=args.guidance, seed=args.seed
    )
    captions = [caption for manifest in evals for caption in first_captions(manifest, args.samples)]
    results, sft_scores = {}, None
    for name, checkpoint in policies.items():
        url = checkpoint_or_newest(checkpoint)
        measured, scores, heldout = measure(
            load_trained(url), reference, dvae, judge, tokenizer, captions, sampling, scope
        )
        sft_scores = scores if sft_scores is None else sft_scores  # "sft" is measured first
        for group, rows in (("seen", ~heldout), ("heldout", heldout)):
            if rows.any():
                measured["alignment"][group]["score"] = mean_interval(scores[rows])
                # Same captions and seeds as the SFT row: the per-caption difference is the paired test.
                measured["alignment"][group]["score_gain"] = mean_interval(scores[rows] - sft_scores[rows])
        results[name] = {"checkpoint": url, **measured}
    print_prompt_alignment(results, "policy", "KL to SFT", lambda result, group: f"{result['kl_to_sft']:.2f}")
    report = {
        **run_header("rlhf_alignment"),
        "sampling": sampling.model_dump(),
        "eval_manifests": evals,
        "judge": judge_checkpoint,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
