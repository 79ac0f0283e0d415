"""DALL-E's discrete VAE: images <-> a grid of codebook indices.

Encoder: a 7x7 stem, groups of residual blocks with a 2x max-pool between groups (3 pools = 8x,
2 = 4x), then per-position logits over ``vocab_size`` codes. Decoder: the mirror image with nearest
upsampling, ending in logit-Laplace parameters (mu, log b) per sub-pixel, or plain pixels for the
MSE variant. Residual branches are scaled by ``1 / n_layers**2`` as in the paper so deep stacks start
close to identity. Training relaxes the codes with Gumbel-softmax; ``encode`` takes the argmax.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.losses.vae import map_pixels, unmap_pixels


class DVAEConfig(BaseModel):
    """``[model]`` of a dVAE stage; the full preset is the paper's (256 px, 8192 codes, 8x)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dvae"] = "dvae"
    image_size: int = Field(256, ge=8)
    vocab_size: int = Field(8192, ge=2)
    hidden: int = Field(256, ge=4)  # channels of the first group; doubled per group
    blocks_per_group: int = Field(2, ge=1)
    downsample: Literal[4, 8] = 8
    decoder_init_channels: int = Field(128, ge=1)
    reconstruction: Literal["logit_laplace", "mse"] = "logit_laplace"

    @model_validator(mode="after")
    def _check(self) -> DVAEConfig:
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if self.hidden % 4:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by 4 (residual bottleneck width)")
        return self

    @property
    def groups(self) -> int:
        return int(math.log2(self.downsample)) + 1

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample


class ResidualBlock(nn.Module):
    """``x + gain * f(x)`` with a bottleneck of ``n_out // 4`` channels; ``kernels`` sets f's convs."""

    def __init__(self, n_in: int, n_out: int, gain: float, kernels: tuple[int, ...]) -> None:
        super().__init__()
        width = n_out // 4
        widths = [n_in] + [width] * (len(kernels) - 1) + [n_out]
        layers: list[nn.Module] = []
        for index, size in enumerate(kernels):
            layers += [nn.ReLU(), nn.Conv2d(widths[index], widths[index + 1], size, padding=size // 2)]
        self.residual = nn.Sequential(*layers)
        self.identity = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(x) + self.gain * self.residual(x)


def _stack(widths: list[tuple[int, int]], config: DVAEConfig, kernels: tuple[int, ...], resample: nn.Module):
    """Groups of residual blocks; ``resample`` (pool or upsample) goes between consecutive groups."""
    gain = 1.0 / (config.groups * config.blocks_per_group) ** 2
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(widths):
        for block in range(config.blocks_per_group):
            layers.append(ResidualBlock(n_in if block == 0 else n_out, n_out, gain, kernels))
        if index < len(widths) - 1:
            layers.append(resample)
    return layers


class DVAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, vocab, H', W') encoder logits
    decoded: torch.Tensor  # (B, 6 or 3, H, W) decoder output: (mu, log b) or pixels


class DVAE(nn.Module):
    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden, groups = config.hidden, config.groups
        enc_out = [hidden * 2**g for g in range(groups)]  # h, 2h, 4h, 8h
        enc_widths = list(zip([hidden] + enc_out[:-1], enc_out))
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hidden, 7, padding=3),
            *_stack(enc_widths, config, (3, 3, 3, 1), nn.MaxPool2d(2)),
            nn.ReLU(),
            nn.Conv2d(enc_widths[-1][1], config.vocab_size, 1),
        )
        dec_out = enc_out[::-1]  # 8h, 4h, 2h, h
        dec_widths = list(zip([config.decoder_init_channels] + dec_out[:-1], dec_out))
        out_channels = 6 if config.reconstruction == "logit_laplace" else 3
        self.decoder = nn.Sequential(
            nn.Conv2d(config.vocab_size, config.decoder_init_channels, 1),
            *_stack(dec_widths, config, (1, 3, 3, 3), nn.Upsample(scale_factor=2, mode="nearest")),
            nn.ReLU(),
            nn.Conv2d(dec_widths[-1][1], out_channels, 1),
        )
        self.activation_checkpointing = False
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # The released dVAE's init: N(0, 1/fan_in), zero bias (torch's default is 3x smaller in
                # variance, which leaves the code logits too flat for Gumbel noise to be overcome early).
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, std=fan_in**-0.5)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_code_logits(self, images: torch.Tensor, logit_std: float = 4.0) -> None:
        """Aim each code at the encoder features of one random latent position of ``images``.

        The last conv becomes ``logit_k = s * <u_k, h - mean(h)>`` with ``u_k`` the unit, centred feature
        vector of a sampled position, ``s`` setting the logits' spread to ``logit_std``: every code then
        wins somewhere in the data (a k-means++-like seeding) instead of one code winning everywhere,
        as it does from a random init whose ReLU features share one large mean direction.
        """
        head = self.encoder[-1]
        features = self._run(self.encoder[:-1], map_pixels(images)).double()
        features = features.movedim(1, -1).reshape(-1, features.shape[1])
        mean = features.mean(0)
        picks = torch.randint(len(features), (self.config.vocab_size,))
        directions = features[picks] - mean
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scale = logit_std / ((features - mean) @ directions.T).std().clamp_min(1e-12)
        head.weight.copy_((scale * directions)[:, :, None, None].to(head.weight.dtype))
        head.bias.copy_((-scale * directions @ mean).to(head.bias.dtype))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each residual block in backward instead of storing its activations."""
        self.activation_checkpointing = enabled

    def _run(self, stack: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for layer in stack:
            if self.activation_checkpointing and self.training and isinstance(layer, ResidualBlock):
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, images: torch.Tensor, temperature: float = 1.0) -> DVAEOutput:
        """Training pass: images in [0, 1] -> logits, Gumbel-softmax relaxed codes -> decoder output."""
        logits = self._run(self.encoder, map_pixels(images))
        soft_codes = F.gumbel_softmax(logits.float(), tau=temperature, dim=1).to(logits.dtype)
        return DVAEOutput(logits, self._run(self.decoder, soft_codes))

    def reconstruction(self, decoded: torch.Tensor) -> torch.Tensor:
        """The decoder's image in [0, 1]: the logit-Laplace location through a sigmoid, or the pixels."""
        if self.config.reconstruction == "logit_laplace":
            return unmap_pixels(torch.sigmoid(decoded[:, :3].float()))
        return decoded.float().clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``(B, 3, H, W)`` -> codes ``(B, H/d, W/d)`` (argmax, no noise)."""
        return self._run(self.encoder, map_pixels(images)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, H', W')`` -> images in [0, 1] ``(B, 3, H, W)``."""
        dtype = next(self.parameters()).dtype
        one_hot = F.one_hot(codes, self.config.vocab_size).permute(0, 3, 1, 2).to(dtype)
        return self.reconstruction(self._run(self.decoder, one_hot))

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) of one image, counted by torch on a meta-device twin."""
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            twin = DVAE(self.config)
            images = torch.zeros(1, 3, self.config.image_size, self.config.image_size)
        with FlopCounterMode(display=False) as counter:
            output = twin(images)
            (output.logits.sum() + output.decoded.sum()).backward()
        return float(counter.get_total_flops())
