"""Stage ``reward``: a reward model for (caption, image) from ranked preference pairs.

The DALL-E transformer initialised from the SFT checkpoint plus a scalar head (InstructGPT's recipe),
trained with the Bradley-Terry loss on the pairs ``tessera rlhf preferences`` wrote. Held-out pair
accuracy (the share of validation pairs whose chosen image gets the higher reward) is its eval metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.checkpoint import read_model_config, read_module_state
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.engine import Engine, LossFn, init_distributed
from trainer.inference import checkpoint_or_newest
from trainer.losses.rlhf import bradley_terry_loss
from trainer.models.dalle import DalleConfig
from trainer.rlhf.policy import RewardModel
from trainer.rlhf.preferences import make_pair_batch
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training


class RewardSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sft_checkpoint: str = Field(
        description="the DALL-E (SFT) checkpoint the reward model starts from, or a run's checkpoint folder"
    )


class PreferenceStageConfig(BaseModel):
    """The sections every stage that trains on preference pairs shares (reward, DPO)."""

    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=RunConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig
    model: DalleConfig | None = Field(None, description="default: the SFT checkpoint's own (its model.json)")

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceStageConfig:
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer is required: the reward model reads captions")
        return self


def with_sft(config: Any, section: str) -> Any:
    """``config`` with ``[section].sft_checkpoint`` resolved to one checkpoint, ``model`` filled from it."""
    inputs = getattr(config, section)
    sft = checkpoint_or_newest(inputs.sft_checkpoint)
    model = config.model or DalleConfig.model_validate(read_model_config(sft))
    if model.text_len != config.data.text_len:
        raise ValueError(
            f"data.text_len ({config.data.text_len}) must equal the model's text_len ({model.text_len})"
        )
    return config.model_copy(
        update={"model": model, section: inputs.model_copy(update={"sft_checkpoint": sft})}
    )


class RewardStageConfig(PreferenceStageConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="reward"))
    reward: RewardSection


CONFIG = RewardStageConfig


def pair_rewards(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the valid rows' chosen and rejected images, in one forward over both."""
    valid = batch["valid"].bool()
    text = batch["text"][valid]
    rewards = model(torch.cat([text, text]), torch.cat([batch["chosen"][valid], batch["rejected"][valid]]))
    return rewards.chunk(2)


def loss_fn(model: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    chosen, rejected = pair_rewards(model, batch)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, {
        "pair_accuracy": float((chosen > rejected).float().mean().detach()),
        "reward_margin": float((chosen - rejected).mean().detach()),
    }


def make_evaluate(loss: LossFn, validation: dict[str, Any]):
    """Validation loss and the loss's metrics on one fixed batch of held-out pairs."""

    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], None]:
        module = engine.module
        module.eval()
        with torch.no_grad():
            batch = {
                k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in validation.items()
            }
            value, metrics = loss(module, batch, step)
        module.train()
        return {"val_loss": float(value), **{f"val_{name}": value for name, value in metrics.items()}}, None

    return evaluate


def train(config: RewardStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()
    config = with_sft(config, "reward")
    torch.manual_seed(config.run.seed)
    model = RewardModel(config.model)
    model.load_policy_state(read_module_state(config.reward.sft_checkpoint))
    prepare = make_pair_batch(config.model.image_len)
    loader_options = {"tokenizer": config.data.tokenizer, "text_len": config.data.text_len}
    parts = StageParts(
        model=model,
        loss_fn=loss_fn,
        prepare_batch=prepare,
        evaluate=make_evaluate(loss_fn, prepare(fixed_validation_batch(config, **loader_options))),
        tokens_per_sample=2 * config.model.seq_len,  # a sample is a pair: two sequences
        flops_per_sample=2 * model.transformer.flops_per_sample(),
    )
    return run_training(config, parts, stage="reward")
