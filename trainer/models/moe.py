"""Mixture-of-experts feed-forward layer: DeepSpeed's ``MoE`` behind a plain module interface.

The one place a model touches DeepSpeed: expert parallelism needs DeepSpeed's all-to-all and its
expert process groups, which ``deepspeed.initialize`` creates for every ``MoE`` module it finds. The
import happens inside the constructor so a dense model never imports DeepSpeed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class MoEConfig(BaseModel):
    """Which feed-forward layers become expert layers, and how tokens are routed to experts."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    every: int = Field(2, ge=1, description="layer i (0-based) is MoE when (i + 1) % every == 0")
    num_experts: int = Field(4, ge=1)
    top_k: Literal[1, 2] = 1
    capacity_factor: float = Field(1.0, gt=0)
    eval_capacity_factor: float = Field(1.0, gt=0)
    min_capacity: int = Field(4, ge=0)
    ep_size: int = Field(
        1, ge=1, description="expert-parallel group size (ranks sharing one layer's experts)"
    )
    drop_tokens: bool = Field(True, description="False = unlimited capacity (no token is ever dropped)")
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss in the total")

    @model_validator(mode="after")
    def _experts_split_evenly(self) -> MoEConfig:
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size})"
            )
        return self

    def is_moe_layer(self, index: int) -> bool:
        return self.enabled and (index + 1) % self.every == 0


def expert_mlp(width: int, hidden: int, dropout: float) -> nn.Sequential:
    """The feed-forward network every expert (and the dense layer) computes."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))


class MoEFeedForward(nn.Module):
    """``x -> (y, aux_loss)`` with ``num_experts`` copies of :func:`expert_mlp` and a top-k gate."""

    def __init__(self, width: int, hidden: int, dropout: float, config: MoEConfig) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden_size=width,
            expert=expert_mlp(width, hidden, dropout),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.top_k,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            drop_tokens=config.drop_tokens,
            noisy_gate_policy=config.noisy_gate_policy,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, aux_loss, _ = self.moe(x)
        return y, aux_loss
