"""The latent-diffusion UNet (Rombach et al. 2022, the Stable Diffusion layout at any size).

Per resolution level: ``res_blocks`` ResBlocks (GroupNorm, SiLU, 3x3 convs, the timestep embedding
added between them), each followed at ``attention_levels`` by a transformer block (self-attention over
the pixels, cross-attention to the text encoding, GEGLU feed-forward), then a stride-2 conv; a middle
ResBlock-attention-ResBlock; the mirror path upsamples and concatenates the skips. The last conv and
every residual branch's last layer start at zero, so the untrained net is the identity plus nothing.
All attention goes through ``kernels.attention`` (via the text encoder's ``MultiHeadAttention``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from trainer.models.text_encoder import MultiHeadAttention, TextConditioned, TextEncoderConfig


class UNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["unet"] = "unet"
    latent_channels: int = Field(4, ge=1)
    latent_size: int = Field(8, ge=1)
    channels: int = Field(64, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2])
    res_blocks: int = Field(1, ge=1)
    attention_levels: list[int] = Field(default_factory=lambda: [1])
    heads: int = Field(4, ge=1)
    groups: int = Field(8, ge=1, description="GroupNorm groups (32 in Stable Diffusion)")
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        levels = len(self.channel_mult)
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"model.attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        if self.latent_size % 2 ** (levels - 1):
            raise ValueError(f"model.latent_size {self.latent_size} must be divisible by {2 ** (levels - 1)}")
        if any((self.channels * m) % self.groups for m in self.channel_mult):
            raise ValueError(f"every level's channels must be divisible by model.groups {self.groups}")
        return self


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the (integer) timestep, as in the transformer's positions (DDPM's choice)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, base: int, width: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base).to(self.mlp[0].weight.dtype))


def zero_init(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_width: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_width, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(time))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class GEGLU(nn.Module):
    """The gated-GELU feed-forward of Stable Diffusion's transformer blocks (Shazeer 2020)."""

    def __init__(self, width: int, mult: int = 4) -> None:
        super().__init__()
        self.project = nn.Linear(width, 2 * mult * width)
        self.out = nn.Linear(mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.project(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """Pixels as tokens: self-attention, cross-attention to the text, feed-forward; residual around all."""

    def __init__(self, channels: int, heads: int, context_width: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.project_in = nn.Conv2d(channels, channels, 1)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attention = MultiHeadAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attention = MultiHeadAttention(channels, heads, context_width)
        self.norm3 = nn.LayerNorm(channels)
        self.feed_forward = GEGLU(channels)
        self.project_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.project_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = h + self.self_attention(self.norm1(h))
        h = h + self.cross_attention(self.norm2(h), context)
        h = h + self.feed_forward(self.norm3(h))
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.project_out(h)


class Level(nn.Module):
    """ResBlocks (+ attention) at one resolution; ``forward`` consumes skips on the way up."""

    def __init__(
        self, ins: list[int], out: int, attention: bool, config: UNetConfig, time_width: int
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, out, time_width, config.groups) for i in ins)
        self.attention = nn.ModuleList(
            SpatialTransformer(out, config.heads, config.text.width, config.groups)
            if attention
            else nn.Identity()
            for _ in ins
        )

    def block(self, index: int, x: torch.Tensor, time: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res[index](x, time)
        attention = self.attention[index]
        return attention(x, context) if isinstance(attention, SpatialTransformer) else x


class UNet(TextConditioned):
    """``(x_t (B, C, S, S), t (B,), text tokens (B, L)) -> eps or v (B, C, S, S)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config.text)
        self.config = config
        widths = [config.channels * m for m in config.channel_mult]
        time_width = 4 * config.channels
        self.time = TimeEmbedding(config.channels, time_width)
        self.stem = nn.Conv2d(config.latent_channels, config.channels, 3, padding=1)
        skips, current = [config.channels], config.channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            ins = [current] + [width] * (config.res_blocks - 1)
            self.down.append(Level(ins, width, level in config.attention_levels, config, time_width))
            skips += [width] * config.res_blocks
            current = width
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
        self.middle = Level([current, current], current, True, config, time_width)
        self.middle.attention[1] = nn.Identity()  # ResBlock, attention, ResBlock
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            ins = []
            for _ in range(config.res_blocks + 1):
                ins.append(current + skips.pop())
                current = width
            self.up.append(Level(ins, width, level in config.attention_levels, config, time_width))
            if level > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        self.head = nn.Sequential(
            nn.GroupNorm(config.groups, current),
            nn.SiLU(),
            zero_init(nn.Conv2d(current, config.latent_channels, 3, padding=1)),
        )

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        time = self.time(t)
        h = self.stem(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for index in range(len(blocks.res)):
                h = blocks.block(index, h, time, context)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.middle.block(1, self.middle.block(0, h, time, context), time, context)
        for level, blocks in enumerate(self.up):
            for index in range(len(blocks.res)):
                h = blocks.block(index, torch.cat([h, skips.pop()], dim=1), time, context)
            if level < len(self.upsample):
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)
