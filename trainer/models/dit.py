"""A diffusion transformer (Peebles & Xie 2023) over latent patches, conditioned on text.

Latents are cut into ``patch x patch`` patches (a strided conv), given learned positions, and run
through blocks of self-attention, cross-attention to the text encoding (as PixArt-alpha adds to DiT)
and an MLP. The timestep plus the mean-pooled text steer every block by adaLN-Zero: the block's
LayerNorms get a per-sample shift and scale, each residual branch a gate, all regressed from that
vector by a linear layer initialised to zero, so every block starts as the identity.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from trainer.models.text_encoder import MultiHeadAttention, TextConditioned, TextEncoderConfig
from trainer.models.unet import TimeEmbedding, zero_init


class DiTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["dit"] = "dit"
    latent_channels: int = Field(4, ge=1)
    latent_size: int = Field(8, ge=1)
    patch: int = Field(2, ge=1)
    width: int = Field(128, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.latent_size % self.patch:
            raise ValueError(
                f"model.latent_size {self.latent_size} must be divisible by model.patch {self.patch}"
            )
        return self


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, context_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.self_attention = MultiHeadAttention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attention = MultiHeadAttention(width, heads, context_width)
        zero_init(self.cross_attention.out)  # ungated branch: zero so the block starts as the identity
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )
        self.modulation = zero_init(nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nn.functional.silu(condition)).chunk(
            6, -1
        )
        x = x + gate1[:, None] * self.self_attention(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attention(self.norm_cross(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(TextConditioned):
    """``(x_t (B, C, S, S), t (B,), text tokens (B, L)) -> eps or v (B, C, S, S)``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__(config.text)
        self.config = config
        grid = config.latent_size // config.patch
        self.patchify = nn.Conv2d(config.latent_channels, config.width, config.patch, stride=config.patch)
        self.position = nn.Parameter(torch.randn(grid * grid, config.width) * 0.02)
        self.time = TimeEmbedding(config.width, config.width)
        self.pool = nn.Linear(config.text.width, config.width)
        self.blocks = nn.ModuleList(
            DiTBlock(config.width, config.heads, config.text.width) for _ in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(config.width, elementwise_affine=False)
        self.final_modulation = zero_init(nn.Linear(config.width, 2 * config.width))
        self.final = zero_init(nn.Linear(config.width, config.patch * config.patch * config.latent_channels))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, size, _ = x.shape
        patch, grid = self.config.patch, size // self.config.patch
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        condition = self.time(t) + self.pool(context.mean(dim=1))
        for block in self.blocks:
            h = block(h, condition, context)
        shift, scale = self.final_modulation(nn.functional.silu(condition)).chunk(2, -1)
        h = self.final(modulate(self.final_norm(h), shift, scale))  # (B, grid^2, patch^2 * C)
        h = h.view(batch, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(batch, channels, size, size)
