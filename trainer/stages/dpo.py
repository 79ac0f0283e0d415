"""Stage ``dpo``: Direct Preference Optimization of the DALL-E transformer on ranked pairs.

The policy starts from the SFT checkpoint, which also serves, frozen, as the reference. DPO needs the
reference's log-likelihood of every chosen and rejected image; those never change, so they are
computed once over the whole preference dataset and cached in a sidecar JSON beside its manifest
(keyed by sample key and named by the SFT checkpoint), and a resumed or repeated run reads them back.
Logged: the DPO loss, implicit reward margins (beta * log-ratio, chosen minus rejected) and preference
accuracy, on training batches and on a fixed validation batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from data_pipeline import storage
from data_pipeline.loader import open_loader
from data_pipeline.manifest import manifest_location
from trainer.checkpoint import read_marker, read_module_state
from trainer.config import RunConfig
from trainer.engine import init_distributed
from trainer.losses.rlhf import dpo_loss
from trainer.models import build
from trainer.rlhf.policy import image_logprobs
from trainer.rlhf.preferences import make_pair_batch
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training
from trainer.stages.reward import PreferenceStageConfig, make_evaluate, with_sft


class DPOSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sft_checkpoint: str = Field(
        description="the DALL-E (SFT) checkpoint: the policy's start and the reference"
    )
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    nll_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the chosen images' per-code NLL added to the DPO loss (RPO, Pang et al. "
        "2024): keeps the chosen images likely, where plain DPO may lower both and drift off the SFT's",
    )


class DPOStageConfig(PreferenceStageConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="dpo"))
    dpo: DPOSection


CONFIG = DPOStageConfig


def pair_logps(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed image log-likelihoods of every row's chosen and rejected codes, in one forward."""
    text = batch["text"]
    logps = image_logprobs(model, torch.cat([text, text]), torch.cat([batch["chosen"], batch["rejected"]]))
    return logps.sum(dim=-1).chunk(2)


def sidecar_url(manifest_url: str, sft_checkpoint: str) -> str:
    """Named by the checkpoint's URL and marker (step, save time): a re-saved checkpoint is a new cache."""
    info = read_marker(sft_checkpoint)
    if info is None:
        raise FileNotFoundError(f"dpo.sft_checkpoint {sft_checkpoint}: not a complete checkpoint")
    identity = f"{sft_checkpoint}|{info.step}|{info.created}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return storage.join(storage.parent(manifest_location(manifest_url)), f"reference-logps-{digest}.json")


@torch.no_grad()
def reference_logps(
    config: DPOStageConfig, reference: torch.nn.Module, manifest_url: str
) -> dict[str, list[float]]:
    """``{sample key: [chosen logp, rejected logp]}`` under the frozen reference, cached by the manifest."""
    url = sidecar_url(manifest_url, config.dpo.sft_checkpoint)
    if storage.exists(url):
        return json.loads(storage.read_bytes(url))
    prepare = make_pair_batch(config.model.image_len)
    loader = open_loader(
        manifest_url,
        rank=0,
        world_size=1,
        batch_size=config.engine.micro_batch_size,
        seed=config.run.seed,
        tokenizer=config.data.tokenizer,
        text_len=config.data.text_len,
    )
    table: dict[str, list[float]] = {}
    for raw in loader:
        batch = prepare(raw)
        chosen, rejected = pair_logps(reference, batch)
        for key, valid, c, r in zip(
            batch["keys"], batch["valid"].tolist(), chosen.tolist(), rejected.tolist()
        ):
            if valid:
                table[key] = [c, r]
    storage.write_bytes_atomic(url, json.dumps(table).encode())
    return table


def make_prepare(config: DPOStageConfig, table: Mapping[str, list[float]]):
    pairs = make_pair_batch(config.model.image_len)

    def prepare(raw: Mapping[str, Any]) -> dict[str, Any]:
        batch = pairs(raw)
        refs = torch.tensor([table.get(key, [0.0, 0.0]) for key in batch["keys"]], dtype=torch.float32)
        missing = [
            key for key, valid in zip(batch["keys"], batch["valid"].tolist()) if valid and key not in table
        ]
        if missing:
            raise KeyError(
                f"no cached reference log-probs for {missing[:3]}: delete the sidecar to rebuild it"
            )
        return {**batch, "ref_chosen": refs[:, 0], "ref_rejected": refs[:, 1]}

    return prepare


def make_loss_fn(beta: float, nll_weight: float = 0.0):
    """DPO on each row's (chosen, rejected), plus ``nll_weight`` times the chosen codes' mean NLL."""

    def loss_fn(model: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        valid = batch["valid"].bool()
        rows = {
            key: batch[key][valid] for key in ("text", "chosen", "rejected", "ref_chosen", "ref_rejected")
        }
        chosen, rejected = pair_logps(model, rows)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, rows["ref_chosen"].float(), rows["ref_rejected"].float(), beta
        )
        chosen_nll = -(chosen / rows["chosen"].shape[1]).mean()
        metrics = {"chosen_nll": float(chosen_nll.detach())}
        if nll_weight:
            loss = loss + nll_weight * chosen_nll
        return loss, {
            **metrics,
            "preference_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
            "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
            "chosen_reward": float(chosen_rewards.mean()),
            "rejected_reward": float(rejected_rewards.mean()),
        }

    return loss_fn


def train(config: DPOStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()
    config = with_sft(config, "dpo")
    torch.manual_seed(config.run.seed)
    sft_state = read_module_state(config.dpo.sft_checkpoint)
    reference = build(config.model, device="cpu")
    reference.load_state_dict(sft_state)
    reference.eval().requires_grad_(False)
    table = reference_logps(config, reference, config.data.manifest)
    validation_url = config.data.validation_manifest or config.data.manifest
    if validation_url != config.data.manifest:
        table = {**table, **reference_logps(config, reference, validation_url)}
    del reference
    policy = build(config.model, device="cpu")
    policy.load_state_dict(sft_state)
    prepare = make_prepare(config, table)
    loss_fn = make_loss_fn(config.dpo.beta, config.dpo.nll_weight)
    loader_options = {"tokenizer": config.data.tokenizer, "text_len": config.data.text_len}
    parts = StageParts(
        model=policy,
        loss_fn=loss_fn,
        prepare_batch=prepare,
        evaluate=make_evaluate(loss_fn, prepare(fixed_validation_batch(config, **loader_options))),
        tokens_per_sample=2 * config.model.seq_len,
        flops_per_sample=2 * policy.flops_per_sample(),
    )
    return run_training(config, parts, stage="dpo")
