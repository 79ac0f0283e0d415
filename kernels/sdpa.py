"""The portable path: ``torch.nn.functional.scaled_dot_product_attention`` with fully masked rows zeroed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.checks import effective_mask
from kernels.layout import cached_for_mask


def _sdpa_mask(
    mask: torch.Tensor, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA's boolean mask, plus a (seq_q, 1) 0/1 multiplier when some rows attend to nothing.

    SDPA returns NaN for a row with no allowed key; such rows get one dummy allowed key each and are then
    multiplied by zero, which also zeroes their gradients.
    """
    mask = mask.to(device)
    if causal:
        mask = mask & torch.ones_like(mask).tril()
    live = mask.any(dim=-1, keepdim=True)
    if bool(live.all()):
        return mask, None
    return mask | ~live, live


def sdpa_attention(q, k, v, *, mask=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention through SDPA (any device, dtype and head dim); rows that attend to nothing give zeros."""
    mask, causal = effective_mask(mask, causal)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    attn_mask, live = cached_for_mask(
        mask, ("sdpa", causal, q.device), lambda: _sdpa_mask(mask, causal, q.device)
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out if live is None else out * live.to(out.dtype)
