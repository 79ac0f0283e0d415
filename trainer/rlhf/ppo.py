"""PPO for the DALL-E policy: settings, reward shaping, the KL controller and the engines' loss functions.

No Ray here: ``cluster.rl`` places the policy, reference, reward and critic on Ray actors and calls
these pieces. One iteration (InstructGPT's step 3):

1. the policy draws one image (a sequence of codes) per prompt and records each code's log-prob;
2. the reference scores the same codes; the reward model (or the judge) scores the finished images;
3. per-token rewards = ``-kl_coef * KL_t`` along the way, plus the score on the last code;
4. GAE over the critic's values gives advantages (whitened per batch) and value targets;
5. several epochs of the clipped surrogate (+ entropy bonus, + ``ptx_coef`` times the SFT loss on
   pretraining data) for the policy, and of the clipped value loss for the critic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.losses.rlhf import (
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    token_logprobs,
    value_loss,
)
from trainer.sampling import SamplingConfig


class PPOSettings(BaseModel):
    """``[ppo]``: the algorithm's knobs (defaults follow InstructGPT / OpenRLHF where they apply)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(20, ge=1, description="rollout + update rounds")
    prompts_per_iteration: int = Field(16, ge=1)
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    clip_eps: float = Field(0.2, gt=0)
    value_clip_eps: float | None = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="initial per-token KL penalty coefficient")
    kl_target: float | None = Field(
        None, gt=0, description="per-image KL the adaptive controller steers to; None keeps kl_coef fixed"
    )
    kl_horizon: int = Field(10_000, ge=1)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    entropy_coef: float = Field(0.0, ge=0)
    ptx_coef: float = Field(0.0, ge=0, description="weight of the SFT (pretraining) loss mixed into PPO")
    whiten_advantages: bool = True
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class AdaptiveKLController:
    """Ziegler et al. (2019): move ``kl_coef`` so the measured KL tracks ``target`` (fixed without one)."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, measured_kl: float, samples: int) -> float:
        if self.target is not None:
            error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * samples / self.horizon
        return self.coef


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``(B, T)`` and KL: ``-kl_coef * KL_t``, plus ``scores`` on the last real token."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(dim=1).clamp_min(1) - 1
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards, kl


def advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, settings: PPOSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def policy_loss_fn(settings: PPOSettings):
    """The policy engine's ``loss_fn`` for rollout batches (+ ``ptx_*`` SFT rows when ``ptx_coef`` > 0)."""

    def loss_fn(model: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        text, codes, mask = batch["text"], batch["codes"], batch["mask"]
        logits = model(text, codes[:, :-1]).image_logits
        logprobs = token_logprobs(logits, codes)
        old, advantages = batch["old_logprobs"], batch["advantages"]
        loss, clipfrac = ppo_policy_loss(logprobs, old, advantages, mask, settings.clip_eps)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = loss - settings.entropy_coef * entropy
        metrics = {
            "policy_loss": float(loss.detach()),
            "clipfrac": float(clipfrac),
            "entropy": float(entropy.detach()),
            "approx_kl_old": float(masked_mean(old - logprobs, mask).detach()),
        }
        if settings.ptx_coef > 0 and "ptx_codes" in batch:
            ptx_logits = model(batch["ptx_text"], batch["ptx_codes"][:, :-1]).image_logits
            ptx = -token_logprobs(ptx_logits, batch["ptx_codes"]).mean()
            loss = loss + settings.ptx_coef * ptx
            metrics["ptx_loss"] = float(ptx.detach())
        return loss, metrics

    return loss_fn


def critic_loss_fn(settings: PPOSettings):
    """The critic engine's ``loss_fn``: clipped value loss against the GAE returns."""

    def loss_fn(model: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        values = model(batch["text"], batch["codes"])
        old, returns, mask = batch["old_values"], batch["returns"], batch["mask"]
        loss, clipfrac = value_loss(values, old, returns, mask, settings.value_clip_eps)
        return loss, {"value_loss": float(loss.detach()), "value_clipfrac": float(clipfrac)}

    return loss_fn
