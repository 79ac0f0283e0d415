"""Input checks shared by every attention entry point: bad shapes fail here with a message."""

from __future__ import annotations

import torch

from kernels.layout import BlockLayout


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> None:
    """q/k/v are ``(batch, heads, seq, head_dim)`` on one device with one dtype; mask is None, a bool
    ``(seq_q, seq_k)`` tensor or a :class:`BlockLayout` of that shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"attention: {name} must be a 4-D tensor (batch, heads, seq, head_dim), got {got}"
            )
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
            f"on {q.device}/{k.device}/{v.device}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention: incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}: "
            "batch and heads must match, k and v must share seq, q and k must share head_dim"
        )
    if mask is None:
        return
    expected = (q.shape[-2], k.shape[-2])
    if isinstance(mask, BlockLayout):
        if (mask.seq_q, mask.seq_k) != expected:
            raise ValueError(f"attention: layout is for {(mask.seq_q, mask.seq_k)}, inputs need {expected}")
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"attention: mask must be a bool tensor (True = attend) or a BlockLayout, got {got}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"attention: mask shape {tuple(mask.shape)} must be (seq_q, seq_k) = {expected}")


def effective_mask(mask, causal: bool) -> tuple[torch.Tensor | None, bool]:
    """Unwrap a layout into (dense bool mask or None, causal): the same attention, in tensor form."""
    if isinstance(mask, BlockLayout):
        dense = mask.mask
        return dense, causal or (dense is None and mask.causal)
    return mask, causal
