"""A small bidirectional transformer over the project's BPE tokens: the denoisers' text condition.

Trained jointly with the denoiser by default. Padding is a learned token like any other (the
attention contract takes one mask per sequence pair, not per example), so an all-padding caption,
which caption dropout produces, encodes to one fixed "null" context: classifier-free guidance's
unconditional input.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kernels import attention
from trainer.models.meta_flops import training_flops


class TextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(1024, ge=2)
    text_len: int = Field(24, ge=1)
    pad_id: int = Field(0, ge=0)
    width: int = Field(64, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention through ``kernels.attention`` (queries from x, keys/values from context)."""

    def __init__(self, width: int, heads: int, context_width: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(width, width, bias=False)
        self.key_value = nn.Linear(context_width or width, 2 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        source = x if context is None else context

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)

        k, v = self.key_value(source).chunk(2, dim=-1)
        y = attention(heads(self.query(x)), heads(k), heads(v))
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = MultiHeadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids ``(B, text_len)`` -> context ``(B, text_len, width)``."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.width)
        self.position = nn.Parameter(torch.randn(config.text_len, config.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(config.width, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.config.text_len:
            raise ValueError(f"text has {tokens.shape[1]} tokens, the encoder expects {self.config.text_len}")
        x = self.token(tokens) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def null_tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The all-padding caption: what caption dropout feeds and unconditional guidance conditions on."""
        return torch.full((1, self.config.text_len), self.config.pad_id, dtype=torch.long, device=device)


class TextConditioned(nn.Module):
    """Base of the denoisers: owns the text encoder (trained jointly) and the call convention.

    ``forward(x_t, t, tokens)`` is the training call; samplers encode the prompt once and call
    ``denoise(x_t, t, context)`` at every step.
    """

    config: BaseModel  # with latent_channels, latent_size and text

    def __init__(self, text: TextEncoderConfig) -> None:
        super().__init__()
        self.text = TextEncoder(text)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.text(tokens))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        config = self.config
        return training_flops(
            lambda: type(self)(config),
            lambda: (
                torch.zeros(1, config.latent_channels, config.latent_size, config.latent_size),
                torch.zeros(1, dtype=torch.long),
                torch.zeros(1, config.text.text_len, dtype=torch.long),
            ),
        )
