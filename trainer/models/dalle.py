"""DALL-E's autoregressive transformer over ``[text tokens ; image tokens]`` (Ramesh et al. 2021).

One decoder-only stream: ``text_len`` BPE tokens, then the ``image_side**2`` codes of a frozen dVAE
in raster order. Position ``p`` predicts token ``p + 1``, so the last text position predicts the first
image code and the first text token is context only. Text padding follows the paper: a pad at
position ``i`` becomes the learned token ``text_vocab_size + i``, so the model knows how long the
caption was and the pads are ordinary prediction targets.

Layers use DALL-E's sparse image-to-image masks from :func:`kernels.masks.dalle_mask`, cycling through
``attention_cycle`` (default ``row, column, row, row``: column attention in every fourth layer, as
in the paper's "(i - 2) mod 4 == 0" rule for 1-based layer i) and ``last_layer_attention`` (default
full causal) in the final layer. Attention goes through :func:`kernels.attention`, so the fused kernel
skips the blocks a mask leaves empty. Column layers attend in column-major token order (the paper's
transposed image states, Fig. 11c): in raster order every causal tile holds some pair of the same
column, so nothing could be skipped (190 of 400 tiles empty at 1280 tokens, against 310 reordered).

Incremental decoding keeps a :class:`KVCache`; a new token attends to the cached keys its mask row
allows, which gives the same tokens as recomputing the whole prefix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import attention
from kernels.layout import BLOCK_M, BLOCK_N, block_layout
from kernels.masks import column_major_order, dalle_mask
from trainer.models.moe import MoEConfig, MoEFeedForward, expert_mlp

AttentionKind = Literal["row", "column", "conv", "full"]


class DalleConfig(BaseModel):
    """Shape of the transformer; ``width = heads * head_dim``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dalle"] = "dalle"
    text_vocab_size: int = Field(16384, ge=1, description="BPE vocabulary (pad tokens are added on top)")
    text_len: int = Field(256, ge=1)
    text_pad_id: int = Field(0, ge=0, description="the tokenizer's pad id, remapped to per-position pads")
    image_vocab_size: int = Field(8192, ge=1, description="dVAE codebook size")
    image_side: int = Field(32, ge=1, description="dVAE latent grid side; image_side**2 image tokens")
    depth: int = Field(64, ge=1)
    heads: int = Field(62, ge=1)
    head_dim: int = Field(64, ge=1)
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    attention_cycle: list[AttentionKind] = Field(default_factory=lambda: ["row", "column", "row", "row"])
    last_layer_attention: AttentionKind | None = Field(
        "full", description="mask of the final layer; None keeps the cycle there too"
    )
    conv_kernel_size: int = Field(11, ge=1, description="odd window side of the conv mask")
    init_std: float = Field(0.02, gt=0)
    moe: MoEConfig = Field(default_factory=MoEConfig)

    @model_validator(mode="after")
    def _check(self) -> DalleConfig:
        if not self.attention_cycle:
            raise ValueError("attention_cycle must name at least one mask kind")
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd, got {self.conv_kernel_size}")
        if self.text_pad_id >= self.text_vocab_size:
            raise ValueError(
                f"text_pad_id {self.text_pad_id} is outside text_vocab_size {self.text_vocab_size}"
            )
        return self

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.image_side**2

    @property
    def seq_len(self) -> int:
        """Longest input: every text token and all but the last image token."""
        return self.text_len + self.image_len - 1

    @property
    def text_classes(self) -> int:
        """Text output classes: the BPE vocabulary plus one pad token per position."""
        return self.text_vocab_size + self.text_len

    def layer_attention(self) -> list[AttentionKind]:
        """The mask kind of every layer, first to last."""
        kinds = [self.attention_cycle[i % len(self.attention_cycle)] for i in range(self.depth)]
        if self.last_layer_attention is not None:
            kinds[-1] = self.last_layer_attention
        return kinds


def remap_text_padding(text: torch.Tensor, pad_id: int, vocab_size: int) -> torch.Tensor:
    """Replace the pad at position i with the per-position pad token ``vocab_size + i``."""
    positions = torch.arange(text.shape[1], device=text.device) + vocab_size
    return torch.where(text == pad_id, positions.expand_as(text), text)


@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values ``(batch, heads, max_len, head_dim)`` and how many positions are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


@dataclasses.dataclass(frozen=True)
class LayerMask:
    """What one layer's attention sees: the mask, in the token order the kernel gets the tokens in.

    ``order`` (None: raster order) gathers queries, keys and values into that order and ``restore`` puts
    the outputs back. Attention is equivariant under the permutation, so only the tiles change.
    """

    mask: torch.Tensor
    order: torch.Tensor | None = None
    restore: torch.Tensor | None = None


@dataclasses.dataclass
class DalleOutput:
    text_logits: torch.Tensor  # (B, text_len - 1, text_classes): predicts text tokens 1..text_len-1
    image_logits: torch.Tensor  # (B, m + 1, image_vocab_size): predicts image tokens 0..m
    aux_loss: torch.Tensor  # summed MoE load-balancing loss (0 for a dense model)
    hidden: torch.Tensor | None = None  # (B, seq, width) final hidden states, for reward and value heads


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: LayerMask, cache: tuple[torch.Tensor, torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:
            keys, values = cache
            keys[:, :, start : start + length] = k
            values[:, :, start : start + length] = v
            k, v = keys[:, :, : start + length], values[:, :, : start + length]
        if mask.order is not None:
            q, k, v = q[:, :, mask.order], k[:, :, mask.order], v[:, :, mask.order]
        y = attention(q, k, v, mask=mask.mask)
        if mask.restore is not None:
            y = y[:, :, mask.restore]
        return self.dropout(self.out(y.transpose(1, 2).reshape(batch, length, width)))


class DenseFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = expert_mlp(width, hidden, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(x), x.new_zeros(())


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + ffn(ln(x))``."""

    def __init__(self, config: DalleConfig, index: int) -> None:
        super().__init__()
        width, hidden = config.width, config.ffn_mult * config.width
        self.attention_kind = config.layer_attention()[index]
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, config.heads, config.dropout)
        self.norm2 = nn.LayerNorm(width)
        if config.moe.is_moe_layer(index):
            self.ffn: nn.Module = MoEFeedForward(width, hidden, config.dropout, config.moe)
        else:
            self.ffn = DenseFeedForward(width, hidden, config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: LayerMask,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x), mask, cache, start)
        y, aux_loss = self.ffn(self.norm2(x))
        return x + y, aux_loss


class DalleTransformer(nn.Module):
    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.text_embedding = nn.Embedding(config.text_classes, width)
        self.text_position = nn.Embedding(config.text_len, width)
        self.image_embedding = nn.Embedding(config.image_vocab_size, width)
        self.image_row = nn.Embedding(config.image_side, width)
        self.image_column = nn.Embedding(config.image_side, width)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.final_norm = nn.LayerNorm(width)
        self.text_head = nn.Linear(width, config.text_classes, bias=False)
        self.image_head = nn.Linear(width, config.image_vocab_size, bias=False)
        self._masks: dict[tuple[str, torch.device, int, int], LayerMask] = {}
        self.activation_checkpointing = False
        self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.activation_checkpointing = enabled

    # -- parameters -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std); residual output projections scaled by 1/sqrt(2 * depth)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.is_meta:  # nothing to fill, and meta-device init dispatch costs seconds at 12B
                continue
            if param.dim() < 2:
                nn.init.zeros_(param) if name.endswith("bias") else nn.init.ones_(param)
            elif name.endswith(("attn.out.weight", ".2.weight")):  # residual-branch outputs
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.depth))
            else:
                nn.init.normal_(param, 0.0, std)

    def layer_attention(self) -> list[str]:
        """The mask kind each block applies (what :meth:`DalleConfig.layer_attention` documents)."""
        return [block.attention_kind for block in self.blocks]

    def flops_per_token(self, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> float:
        """Training FLOPs (forward + backward) per sequence position, averaged over the sequence:
        :meth:`weight_flops_per_token` plus :meth:`attention_flops_per_token`."""
        return self.weight_flops_per_token() + self.attention_flops_per_token(block_m, block_n)

    def weight_flops_per_token(self) -> float:
        """6 per weight a position is multiplied through: the text or the image head by position, and in
        expert layers top_k experts wherever they live (a rank holding ``num_experts / ep_size`` of them
        computes its share of the tokens, so per-token FLOPs do not shrink with ``ep_size``). MoE capacity
        padding and token dispatch are not counted."""
        cfg = self.config
        share = {"text_head": (cfg.text_len - 1) / cfg.seq_len, "image_head": cfg.image_len / cfg.seq_len}
        expert_share = cfg.moe.top_k / (cfg.moe.num_experts // cfg.moe.ep_size)  # per local expert
        weights = 0.0
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                count = getattr(module.weight, "ds_numel", module.weight.numel())  # ZeRO-3 size
                weights += count * (expert_share if ".deepspeed_experts." in name else share.get(name, 1.0))
        return 6 * weights

    def attention_flops_per_token(self, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> float:
        """``12 * width`` per attention score the fused kernel computes (QK^T and PV forward, three times
        that with the backward): every non-empty ``block_m x block_n`` tile of each layer's mask in the
        order the layer attends in (column layers column-major), in full."""
        cfg = self.config
        scores = sum(
            block_layout(
                self.mask(kind, "cpu", 0, cfg.seq_len).mask, block_m=block_m, block_n=block_n
            ).computed_pairs()
            for kind in self.layer_attention()
        )
        return 12 * cfg.width * scores / cfg.seq_len

    def flops_per_sample(self) -> float:
        """What ``trainer.engine`` divides by step time for MFU."""
        return self.flops_per_token() * self.config.seq_len

    def mask(self, kind: str, device: torch.device | str, start: int, stop: int) -> LayerMask:
        """Rows ``start:stop`` of the layer's mask over keys ``0:stop``, on ``device``.

        A whole prefix (``start == 0``) of a column layer attends in column-major order; rows of a
        prefix already cached (decoding) stay in raster order, the order the cache holds keys in. The
        same object is returned for the same slice, so the attention kernels' per-mask caches (SDPA
        mask, block-sparse layout) are built once, not once per layer per step.
        """
        key = (kind, torch.device(device), start, stop)
        if key not in self._masks:
            cfg = self.config
            full = dalle_mask(cfg.text_len, cfg.image_side, kind, kernel_size=cfg.conv_kernel_size)
            self._masks[key] = LayerMask(full[start:stop, :stop].to(device))
            if kind == "column" and start == 0 and stop > cfg.text_len + cfg.image_side:
                # A prefix reaching into the second image row: column-major order differs from raster.
                order = column_major_order(cfg.text_len, cfg.image_side)
                order = order[order < stop]
                reordered = full[:stop, :stop][order][:, order]
                self._masks[key] = LayerMask(
                    reordered.to(device), order.to(device), order.argsort().to(device)
                )
        return self._masks[key]

    # -- embeddings -------------------------------------------------------------------------------
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if text.shape[1] != cfg.text_len:
            raise ValueError(
                f"text has {text.shape[1]} tokens per row, the model expects text_len={cfg.text_len}"
            )
        low, high = (int(text.min()), int(text.max())) if text.numel() else (0, 0)
        if low < 0 or high >= cfg.text_vocab_size:
            raise ValueError(f"text token ids must lie in [0, {cfg.text_vocab_size}), got [{low}, {high}]")
        tokens = remap_text_padding(text, cfg.text_pad_id, cfg.text_vocab_size)
        # Through the module, not ``.weight``: ZeRO-3 gathers a partitioned parameter only in its forward.
        return self.text_embedding(tokens) + self.text_position(
            torch.arange(cfg.text_len, device=text.device)
        )

    def embed_image(self, codes: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Embed image codes that sit at raster positions ``first, first + 1, ...``."""
        cfg = self.config
        positions = torch.arange(first, first + codes.shape[1], device=codes.device)
        if codes.shape[1] and (int(positions[-1]) >= cfg.image_len):
            raise ValueError(
                f"image positions reach {int(positions[-1])}, beyond image_side**2={cfg.image_len}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.image_vocab_size):
            raise ValueError(f"image codes must lie in [0, {cfg.image_vocab_size})")
        rows, columns = positions // cfg.image_side, positions % cfg.image_side
        return self.image_embedding(codes) + self.image_row(rows) + self.image_column(columns)

    # -- full-sequence forward --------------------------------------------------------------------
    def forward(self, text: torch.Tensor, image_inputs: torch.Tensor) -> DalleOutput:
        """``text`` (B, text_len) with the tokenizer's pads; ``image_inputs`` (B, m), m < image_side**2.

        Training passes ``codes[:, :-1]``; sampling without a cache passes the prefix drawn so far.
        """
        cfg = self.config
        if image_inputs.shape[1] >= cfg.image_len:
            raise ValueError(
                f"image_inputs has {image_inputs.shape[1]} codes; pass at most image_side**2 - 1 = "
                f"{cfg.image_len - 1} (the last code is only a target)"
            )
        x = torch.cat([self.embed_text(text), self.embed_image(image_inputs)], dim=1)
        length = x.shape[1]
        aux_total = x.new_zeros(())
        for block in self.blocks:
            mask = self.mask(block.attention_kind, x.device, 0, length)
            if self.activation_checkpointing and self.training:
                x, aux_loss = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x, aux_loss = block(x, mask)
            aux_total = aux_total + aux_loss
        h = self.final_norm(x)
        return DalleOutput(
            text_logits=self.text_head(h[:, : cfg.text_len - 1]),
            image_logits=self.image_head(h[:, cfg.text_len - 1 :]),
            aux_loss=aux_total,
            hidden=h,
        )

    # -- incremental decoding ---------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        cfg = self.config
        shape = (batch, cfg.heads, cfg.seq_len, cfg.head_dim)
        return KVCache(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
        )

    def _extend(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run new positions ``cache.length ...`` through every block against the cache; final hidden."""
        start, stop = cache.length, cache.length + x.shape[1]
        if stop > self.config.seq_len:
            raise ValueError(f"KV cache holds {self.config.seq_len} positions; asked to fill up to {stop}")
        for index, block in enumerate(self.blocks):
            # The rows of the new positions, over every key up to them: exactly what the mask allows.
            mask = self.mask(block.attention_kind, x.device, start, stop)
            x, _ = block(x, mask, (cache.keys[index], cache.values[index]), start)
        cache.length = stop
        return self.final_norm(x)

    def prefill(self, text: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the caption into an empty cache; returns logits (B, image_vocab) for image code 0."""
        if cache.length:
            raise ValueError("prefill needs an empty cache")
        h = self._extend(self.embed_text(text), cache)
        return self.image_head(h[:, -1])

    def decode_step(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image code number ``cache.length - text_len`` (B,); returns logits for the next code."""
        first = cache.length - self.config.text_len
        h = self._extend(self.embed_image(codes[:, None], first), cache)
        return self.image_head(h[:, -1])
