"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022, "KL-f4/f8").

Encoder: a stem conv, then per level ResBlocks and a stride-2 conv (``len(channel_mult) - 1`` halvings:
3 levels = 4x, 4 levels = 8x), a middle ResBlock, and a conv to the mean and log-variance of a
diagonal Gaussian over ``latent_channels`` maps. The decoder mirrors it with nearest-neighbour
upsampling. ``scale_factor`` (1 / std of the training latents, measured by the autoencoder stage and
saved with the weights) makes the diffusion model's inputs unit-variance without a hard-coded 0.18215.
Images are in [0, 1] outside, [-1, 1] inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from trainer.models.meta_flops import training_flops


class AutoencoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["kl_autoencoder"] = "kl_autoencoder"
    image_size: int = Field(32, ge=4)
    channels: int = Field(32, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], description="3 levels = 4x down")
    res_blocks: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    groups: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if self.downsample not in (4, 8):
            raise ValueError(
                f"model.channel_mult must give 4x or 8x downsampling (3 or 4 levels), not {self.downsample}x"
            )
        if self.image_size % self.downsample:
            raise ValueError(f"model.image_size {self.image_size} must be divisible by {self.downsample}")
        if any((self.channels * m) % self.groups for m in self.channel_mult):
            raise ValueError(f"every level's channels must be divisible by model.groups {self.groups}")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _tail(channels: int, out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W), [0, 1] scale (unclamped)
    mean: torch.Tensor  # (B, latent_channels, h, w)
    logvar: torch.Tensor


class KLAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.channels * m for m in config.channel_mult]
        groups, blocks = config.groups, config.res_blocks
        encoder: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(blocks):
                encoder.append(ResBlock(current, width, groups))
                current = width
            if level < len(widths) - 1:
                encoder.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        encoder += [ResBlock(current, current, groups), _tail(current, 2 * config.latent_channels, groups)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, current, 3, padding=1)]
        decoder.append(ResBlock(current, current, groups))
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(blocks):
                decoder.append(ResBlock(current, width, groups))
                current = width
            if level > 0:
                decoder += [
                    nn.Upsample(scale_factor=2.0, mode="nearest"),
                    nn.Conv2d(width, width, 3, padding=1),
                ]
        decoder.append(_tail(current, 3, groups))
        self.decoder = nn.Sequential(*decoder)
        self.register_buffer("scale_factor", torch.ones(()))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (clamped to [-30, 20] as in LDM) of q(z | image)."""
        mean, logvar = self.encoder(images * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        mean, logvar = self.posterior(images)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # reparameterised sample
        return AutoencoderOutput(self.decode_raw(z), mean, logvar)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z) + 1) / 2

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> diffusion latents: the posterior mean times ``scale_factor``."""
        return self.posterior(images)[0] * self.scale_factor.to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [0, 1]."""
        return self.decode_raw(latents / self.scale_factor.to(latents.dtype)).clamp(0, 1)

    def flops_per_sample(self) -> float:
        size = self.config.image_size
        return training_flops(lambda: type(self)(self.config), lambda: (torch.zeros(1, 3, size, size),))
