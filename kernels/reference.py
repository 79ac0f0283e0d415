"""Plain float64 attention: explicit scores and a masked softmax. Every kernel test compares against it."""

from __future__ import annotations

import math

import torch

from kernels.checks import effective_mask


def reference_attention(
    q, k, v, *, mask=None, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float64; rows that attend to nothing give zeros.

    Differentiable: pass float64 leaves with ``requires_grad`` and call ``backward`` for reference gradients.
    """
    mask, causal = effective_mask(mask, causal)
    q, k, v = q.double(), k.double(), v.double()
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & mask.to(q.device)
    if causal:
        keep = keep.tril()
    live = keep.any(dim=-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    probs = torch.softmax(scores, dim=-1) * live
    return probs @ v
