"""Drawing image codes from the DALL-E transformer: KV-cache decoding, top-k/top-p, guidance.

With the cache each new code costs one position through the network (its keys and values are
appended, and its mask row picks which cached keys it sees); without it every code re-runs the
whole prefix, which is the baseline ``bench/sampling.py`` measures. Both paths draw from the same
logits in the same order, so a fixed generator gives the same codes either way.

Classifier-free guidance (Ho & Salimans 2022) runs each caption next to an all-padding caption in
one batch and samples from ``uncond + scale * (cond - uncond)``; the stage trains the unconditional
model by dropping captions.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.models.dalle import DalleTransformer


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1, description="keep the k most likely codes")
    top_p: float | None = Field(None, gt=0, le=1, description="keep the smallest set with this mass")
    guidance_scale: float = Field(
        1.0, ge=0, description="1 = conditional only; >1 = classifier-free guidance"
    )
    use_cache: bool = True
    seed: int = 0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (the most likely stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows ``[cond ; uncond]`` -> ``uncond + scale * (cond - uncond)``; unchanged when scale is 1."""
    if scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def draw(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row from ``logits`` (B, V) after temperature, top-k and top-p."""
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_codes(
    model: DalleTransformer,
    text: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image codes ``(B, image_side**2)`` for captions ``text`` (B, text_len) with the tokenizer's pads."""
    cfg = model.config
    if generator is None:
        generator = torch.Generator(device=text.device).manual_seed(config.seed)
    guided = config.guidance_scale != 1.0
    if guided:
        text = torch.cat([text, torch.full_like(text, cfg.text_pad_id)])
    batch = text.shape[0]
    codes = torch.zeros(batch, cfg.image_len, dtype=torch.long, device=text.device)
    was_training = model.training
    model.eval()
    try:
        if config.use_cache:
            dtype = next(model.parameters()).dtype
            cache = model.new_cache(batch, text.device, dtype)
            logits = model.prefill(text, cache)
        for index in range(cfg.image_len):
            if not config.use_cache:
                logits = model(text, codes[:, :index]).image_logits[:, -1]
            token = draw(guided_logits(logits, config.guidance_scale), config, generator)
            codes[:, index] = token.repeat(2) if guided else token
            if config.use_cache and index + 1 < cfg.image_len:
                logits = model.decode_step(codes[:, index], cache)
    finally:
        model.train(was_training)
    return codes[: batch // 2] if guided else codes
