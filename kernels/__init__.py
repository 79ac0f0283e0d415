"""Attention for Tessera: one entry point, a fused Triton kernel on GPUs, SDPA everywhere else.

``attention`` is what models call; it never makes the caller branch on device, dtype or head size.
``fused_attention`` always runs the Triton kernel (on CPU tensors only under ``TRITON_INTERPRET=1``).
Triton is imported lazily, so CPU-only installs without it still get ``attention``.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels import masks
from kernels.checks import check_inputs
from kernels.layout import BLOCK_M, BLOCK_N, BlockLayout, block_layout
from kernels.sdpa import sdpa_attention

__all__ = ["BlockLayout", "attention", "block_layout", "fused_attention", "masks", "sdpa_attention"]

FUSED_DTYPES = (torch.float16, torch.bfloat16)
FUSED_HEAD_DIMS = (32, 64, 128)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention`` takes the Triton path for these inputs (CUDA, fp16/bf16, head dim 32/64/128)."""
    return (
        _HAS_TRITON
        and q.is_cuda
        and q.dtype in FUSED_DTYPES
        and q.shape[-1] in FUSED_HEAD_DIMS
        and v.shape[-1] == q.shape[-1]
        and q.shape[-2] > 0
        and k.shape[-2] > 0
    )


def fused_attention(
    q,
    k,
    v,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """The Triton FlashAttention-2 kernel with block-sparse masks; differentiable. See ``attention``."""
    from kernels.triton_attention import triton_attention

    check_inputs(q, k, v, mask)
    return triton_attention(q, k, v, mask=mask, causal=causal, scale=scale, block_m=block_m, block_n=block_n)


def attention(q, k, v, *, mask=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q/k/v ``(batch, heads, seq, head_dim)``.

    ``mask``: None, a bool ``(seq_q, seq_k)`` tensor (True = attend; e.g. from ``kernels.masks``) or a
    ``BlockLayout``. ``causal`` is top-left aligned, like SDPA's ``is_causal``, and combines with ``mask``.
    ``scale`` defaults to ``1/sqrt(head_dim)``. Rows that attend to nothing give zeros (and zero gradients).
    """
    check_inputs(q, k, v, mask)
    if fused_supported(q, k, v):
        return fused_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    return sdpa_attention(q, k, v, mask=mask, causal=causal, scale=scale)
