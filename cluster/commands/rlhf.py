"""``tessera rlhf preferences``: ranked sample pairs from an SFT policy, as a preference dataset.

For ``num_prompts`` training captions the policy draws ``samples_per_prompt`` images each; a labeller
scores them (the evals judge's prompt-alignment score by default, or human scores from a JSONL file);
the best and the worst of each prompt become a pair. Pairs are ingested on Ray like any dataset into
``dest/train`` and ``dest/val`` (manifests, shards), where ``tessera train reward`` and ``tessera train
dpo`` read them. The chosen-vs-rejected grid and the counts go to MLflow.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.cli import add_common_args
from cluster.config import load_config

log = logging.getLogger(__name__)


class PreferencesConfig(BaseModel):
    """``[preferences]``: where the policy, its decoder and the prompts come from, and who ranks."""

    model_config = ConfigDict(extra="forbid")

    policy_checkpoint: str = Field(description="the DALL-E (SFT) checkpoint (or run folder) that draws")
    dvae_checkpoint: str = Field(description="the dVAE checkpoint (or run folder) that decodes codes")
    tokenizer: str = Field(description="tokenizer.json URL the policy was trained with")
    prompts_manifest: str = Field(description="prompts are the distinct captions of this dataset")
    dest: str = Field(description="dataset URL; pairs go to dest/train and dest/val")
    num_prompts: int = Field(64, ge=2)
    samples_per_prompt: int = Field(4, ge=2)
    validation_fraction: float = Field(0.25, gt=0, lt=1)
    chunk: int = Field(64, ge=1, description="captions drawn per sampler call")
    seed: int = 0
    temperature: float = Field(1.0, gt=0)
    labeller: Literal["judge", "file"] = "judge"
    judge_checkpoint: str | None = None
    judge_config: str | None = Field(None, description="the judge stage's TOML (its [model] must match)")
    rankings: str | None = Field(
        None, description='JSONL of {"id": "p00003-s01", "score": x} for labeller=file'
    )

    @model_validator(mode="after")
    def _labeller_inputs(self) -> PreferencesConfig:
        if self.labeller == "judge" and not (self.judge_checkpoint and self.judge_config):
            raise ValueError("labeller 'judge' needs judge_checkpoint and judge_config")
        if self.labeller == "file" and not self.rankings:
            raise ValueError("labeller 'file' needs rankings (a JSONL file of candidate scores)")
        return self


class PreferencesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preferences: PreferencesConfig


class JudgeLabeller:
    """The evals judge as labeller: ``evals.alignment.alignment_score`` of each image for its prompt."""

    name = "judge"

    def __init__(self, checkpoint: str, judge_config: str) -> None:
        from evals.judge import load_judge, read_card
        from evals.judge_stage import JudgeStageConfig
        from evals.run import judge_verdict_scope
        from trainer.inference import checkpoint_or_newest

        model = load_config(JudgeStageConfig, judge_config).model
        checkpoint = checkpoint_or_newest(checkpoint)
        # Refuses a judge below the evals' bar, and says which verdicts it may give, as `tessera eval` does.
        scope, _ = judge_verdict_scope(read_card(checkpoint))
        self.small_shapes = scope["small_shapes"]
        self.judge = load_judge(checkpoint, model, required=[])

    def score(self, prompts: Sequence[str], images: torch.Tensor, ids: Sequence[str]) -> list[float]:
        from evals.alignment import alignment_score, parse_caption
        from evals.judge import judge_images

        verdicts = judge_images(self.judge, images)
        return [
            alignment_score(parse_caption(prompt), scene, digit, small_shapes=self.small_shapes)
            for prompt, scene, digit in zip(prompts, verdicts.scenes, verdicts.digits)
        ]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rlhf", help="RLHF data tools (preference pairs)")
    actions = parser.add_subparsers(dest="rlhf_command", required=True, metavar="ACTION")
    prefs = actions.add_parser("preferences", help="rank K samples per prompt from a policy into pairs")
    add_common_args(prefs, default_run_dir="runs/preferences")
    prefs.set_defaults(func=main)


def distinct_captions(manifest_url: str, count: int) -> list[str]:
    from data_pipeline.tokenizer import iter_captions

    seen: dict[str, None] = {}
    for caption in iter_captions(manifest_url):
        seen.setdefault(caption, None)
        if len(seen) == count:
            break
    if len(seen) < 2:
        raise ValueError(f"{manifest_url}: fewer than 2 distinct captions to prompt with")
    return list(seen)


def build_preferences(config: PreferencesConfig, run_dir: str) -> dict:
    from tqdm import tqdm

    from data_pipeline.ingest import ingest
    from data_pipeline.storage import join
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.inference import checkpoint_or_newest, load_frozen_dvae, load_trained
    from trainer.rlhf.preferences import (
        PreferenceSource,
        RankingFileLabeller,
        draw_candidates,
        rank_candidates,
    )
    from trainer.sampling import SamplingConfig
    from trainer.tracking import Tracker

    config = config.model_copy(
        update={
            name: checkpoint_or_newest(getattr(config, name))
            for name in ("policy_checkpoint", "dvae_checkpoint")
        }
    )
    policy = load_trained(config.policy_checkpoint)
    dvae = load_frozen_dvae(config.dvae_checkpoint)
    tokenizer = load_tokenizer(config.tokenizer)
    labeller = (
        JudgeLabeller(config.judge_checkpoint, config.judge_config)
        if config.labeller == "judge"
        else RankingFileLabeller(config.rankings)
    )
    prompts = distinct_captions(config.prompts_manifest, config.num_prompts)
    sampling = SamplingConfig(temperature=config.temperature)
    codes, images = [], []
    chunks = [prompts[i : i + config.chunk] for i in range(0, len(prompts), config.chunk)]
    for number, chunk in enumerate(tqdm(chunks, desc="drawing candidates", unit="chunk")):
        text = tokenizer.encode_batch(chunk, policy.config.text_len)
        drawn = draw_candidates(
            policy, dvae.decode, text, config.samples_per_prompt, sampling, config.seed + number
        )
        codes.append(drawn[0])
        images.append(drawn[1])
    pairs, ties = rank_candidates(prompts, torch.cat(codes), torch.cat(images), labeller)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} prompts gave a preference ({ties} ties): draw more prompts or samples"
        )
    held = max(1, round(len(pairs) * config.validation_fraction))
    info = {
        "policy_checkpoint": config.policy_checkpoint,
        "labeller": labeller.name,
        "samples_per_prompt": config.samples_per_prompt,
        "seed": config.seed,
    }
    splits = {"train": pairs[held:], "val": pairs[:held]}
    manifests = {
        name: ingest(PreferenceSource(part, info), join(config.dest, name), image_size=dvae.config.image_size)
        for name, part in splits.items()
    }
    report = {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "ties": ties,
        "chosen_score_mean": sum(p.chosen_score for p in pairs) / len(pairs),
        "rejected_score_mean": sum(p.rejected_score for p in pairs) / len(pairs),
        **{f"{name}_samples": manifest.num_samples for name, manifest in manifests.items()},
    }
    shown = pairs[:8]
    side = policy.config.image_side
    with torch.no_grad():
        rejected = dvae.decode(torch.tensor([p.rejected_codes for p in shown]).view(-1, side, side)).float()
    chosen = torch.stack([torch.from_numpy(p.chosen_image).permute(2, 0, 1).float() / 255 for p in shown])
    with Tracker("tessera-rlhf", "preferences", run_dir=run_dir, tags={"stage": "preferences"}) as tracker:
        tracker.log_params(config.model_dump(mode="json"))
        tracker.log_metrics(report, step=0)
        tracker.log_image_grid(
            torch.stack(list(itertools.chain.from_iterable(zip(chosen, rejected)))),
            "pairs/chosen_rejected.png",
            nrow=2,
        )
        tracker.log_dict(report, "pairs/report.json")
    return {**report, "train": join(config.dest, "train"), "val": join(config.dest, "val")}


def main(args: argparse.Namespace) -> int:
    from cluster.runtime import init_ray

    config = load_config(PreferencesFile, args.config, args.overrides).preferences
    init_ray(args.ray_address)
    print(json.dumps(build_preferences(config, args.run_dir), indent=2))
    return 0
