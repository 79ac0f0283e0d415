"""FlashAttention-2 in Triton with block-sparse masks: forward, and a backward that recomputes the scores.

Forward (one program per query block and batch*head): stream the layout's non-empty key blocks for this query
block with an online softmax (running max ``m`` and sum ``l`` in fp32, base-2 exponentials), never
materialising the score matrix; store the output and the log-sum-exp (base 2, in scaled-score units).
Backward: ``delta = rowsum(dO * O)``; one kernel per key block walks the transposed layout (the query blocks
that see it) to accumulate dK and dV, one kernel per query block walks the forward layout to accumulate dQ.
Both recompute ``P = exp2(S - lse)``, so no attention matrix is ever stored and no atomics are needed.

Only partial tiles pay for masking: key bounds always, causality by index, the dense mask by an element load.
Rows that attend to nothing get output 0 and ``lse = +inf``, which makes their recomputed P exactly 0.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.checks import effective_mask
from kernels.layout import BLOCK_M, BLOCK_N, BlockLayout, block_layout

LOG2_E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton decides at import whether kernels run compiled (CUDA tensors) or interpreted (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mask_scores(
    s,
    q_idx,
    k_idx,
    seq_q,
    seq_k,
    mask_ptr,
    stride_mq,
    stride_mk,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """-inf where a (query, key) pair of a partial tile is out of bounds, in the future, or masked."""
    keep = (q_idx < seq_q) & (k_idx < seq_k)
    if IS_CAUSAL:
        keep = keep & (k_idx <= q_idx)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + q_idx * stride_mq + k_idx * stride_mk, mask=keep, other=0)
        keep = keep & (allowed != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, Mask,
    kv_counts, kv_indices, kv_partial, kv_width,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mq, stride_mk,
    num_heads, seq_q, seq_k, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    block_q = tl.program_id(0)
    batch_head = tl.program_id(1)
    b, h = batch_head // num_heads, batch_head % num_heads
    q_idx = block_q * BLOCK_M + tl.arange(0, BLOCK_M)
    d_idx = tl.arange(0, HEAD_DIM)
    rows_in = q_idx < seq_q
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    q = tl.load(Q + q_idx[:, None] * stride_qs + d_idx[None, :] * stride_qd, mask=rows_in[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(tl.load(kv_counts + block_q)):
        block_k = tl.load(kv_indices + block_q * kv_width + i)
        k_idx = block_k * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_in = k_idx < seq_k
        k_t = tl.load(
            K + k_idx[None, :] * stride_ks + d_idx[:, None] * stride_kd, mask=cols_in[None, :], other=0.0
        )
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
        if tl.load(kv_partial + block_q * kv_width + i) != 0:
            s = _mask_scores(
                s,
                q_idx[:, None],
                k_idx[None, :],
                seq_q,
                seq_k,
                Mask,
                stride_mq,
                stride_mk,
                HAS_MASK,
                IS_CAUSAL,
            )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While a row has seen no allowed key its max is -inf; shift by 0 then so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + k_idx[:, None] * stride_vs + d_idx[None, :] * stride_vd, mask=cols_in[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    Out += b * stride_ob + h * stride_oh
    tl.store(
        Out + q_idx[:, None] * stride_os + d_idx[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=rows_in[:, None],
    )
    tl.store(Lse + batch_head * seq_q + q_idx, lse, mask=rows_in)


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, Mask,
    q_counts, q_indices, q_partial, q_width,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mq, stride_mk,
    num_heads, seq_q, seq_k, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block from the query blocks that attend to it, on transposed (key x query) tiles."""
    block_k = tl.program_id(0)
    batch_head = tl.program_id(1)
    b, h = batch_head // num_heads, batch_head % num_heads
    k_idx = block_k * BLOCK_N + tl.arange(0, BLOCK_N)
    d_idx = tl.arange(0, HEAD_DIM)
    cols_in = k_idx < seq_k
    Q += b * stride_qb + h * stride_qh
    dO += b * stride_ob + h * stride_oh
    k = tl.load(
        K + b * stride_kb + h * stride_kh + k_idx[:, None] * stride_ks + d_idx[None, :] * stride_kd,
        mask=cols_in[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + k_idx[:, None] * stride_vs + d_idx[None, :] * stride_vd,
        mask=cols_in[:, None],
        other=0.0,
    )

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for i in range(tl.load(q_counts + block_k)):
        block_q = tl.load(q_indices + block_k * q_width + i)
        q_idx = block_q * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_in = q_idx < seq_q
        q = tl.load(
            Q + q_idx[:, None] * stride_qs + d_idx[None, :] * stride_qd, mask=rows_in[:, None], other=0.0
        )
        do = tl.load(
            dO + q_idx[:, None] * stride_os + d_idx[None, :] * stride_od, mask=rows_in[:, None], other=0.0
        )
        lse = tl.load(Lse + batch_head * seq_q + q_idx, mask=rows_in, other=float("inf"))
        delta = tl.load(Delta + batch_head * seq_q + q_idx, mask=rows_in, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
        if tl.load(q_partial + block_k * q_width + i) != 0:
            s_t = _mask_scores(
                s_t,
                q_idx[None, :],
                k_idx[:, None],
                seq_q,
                seq_k,
                Mask,
                stride_mq,
                stride_mk,
                HAS_MASK,
                IS_CAUSAL,
            )
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dk *= scale
    tl.store(
        dK + b * stride_kb + h * stride_kh + k_idx[:, None] * stride_ks + d_idx[None, :] * stride_kd,
        dk.to(dK.dtype.element_ty),
        mask=cols_in[:, None],
    )
    tl.store(
        dV + b * stride_vb + h * stride_vh + k_idx[:, None] * stride_vs + d_idx[None, :] * stride_vd,
        dv.to(dV.dtype.element_ty),
        mask=cols_in[:, None],
    )


@triton.jit
def _backward_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ, Mask,
    kv_counts, kv_indices, kv_partial, kv_width,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mq, stride_mk,
    num_heads, seq_q, seq_k, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of one query block, from the key blocks it attends to (the forward layout)."""
    block_q = tl.program_id(0)
    batch_head = tl.program_id(1)
    b, h = batch_head // num_heads, batch_head % num_heads
    q_idx = block_q * BLOCK_M + tl.arange(0, BLOCK_M)
    d_idx = tl.arange(0, HEAD_DIM)
    rows_in = q_idx < seq_q
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    q_offsets = q_idx[:, None] * stride_qs + d_idx[None, :] * stride_qd
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_offsets, mask=rows_in[:, None], other=0.0)
    do = tl.load(
        dO + b * stride_ob + h * stride_oh + q_idx[:, None] * stride_os + d_idx[None, :] * stride_od,
        mask=rows_in[:, None],
        other=0.0,
    )
    lse = tl.load(Lse + batch_head * seq_q + q_idx, mask=rows_in, other=float("inf"))
    delta = tl.load(Delta + batch_head * seq_q + q_idx, mask=rows_in, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(tl.load(kv_counts + block_q)):
        block_k = tl.load(kv_indices + block_q * kv_width + i)
        k_idx = block_k * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_in = k_idx < seq_k
        k = tl.load(
            K + k_idx[:, None] * stride_ks + d_idx[None, :] * stride_kd, mask=cols_in[:, None], other=0.0
        )
        v = tl.load(
            V + k_idx[:, None] * stride_vs + d_idx[None, :] * stride_vd, mask=cols_in[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if tl.load(kv_partial + block_q * kv_width + i) != 0:
            s = _mask_scores(
                s,
                q_idx[:, None],
                k_idx[None, :],
                seq_q,
                seq_k,
                Mask,
                stride_mq,
                stride_mk,
                HAS_MASK,
                IS_CAUSAL,
            )
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq *= scale
    tl.store(
        dQ + b * stride_qb + h * stride_qh + q_offsets, dq.to(dQ.dtype.element_ty), mask=rows_in[:, None]
    )


def _launch_config(q: torch.Tensor, layout: BlockLayout) -> dict:
    """Constexprs and the element mask shared by all three kernels."""
    if layout.mask is None:  # kernels compiled with HAS_MASK=False never read the mask pointer
        mask, mask_strides = layout.kv_counts, (0, 0)
    else:
        mask, mask_strides = layout.mask.view(torch.uint8), layout.mask.stride()
    return {
        "mask": mask,
        "mask_strides": mask_strides,
        "meta": {
            "HEAD_DIM": q.shape[-1],
            "BLOCK_M": layout.block_m,
            "BLOCK_N": layout.block_n,
            "HAS_MASK": layout.mask is not None,
            "IS_CAUSAL": layout.causal,
            # fp32 inputs get true fp32 products (no TF32), so fp32 results match the float64 reference.
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "num_warps": 4 if q.shape[-1] <= 64 else 8,
        },
    }


def _forward(q, k, v, layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch * heads, seq_q, device=q.device, dtype=torch.float32)
    cfg = _launch_config(q, layout)
    grid = (triton.cdiv(seq_q, layout.block_m), batch * heads)
    _forward_kernel[grid](
        q, k, v, out, lse, cfg["mask"],
        layout.kv_counts, layout.kv_indices, layout.kv_partial, layout.kv_indices.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *cfg["mask_strides"],
        heads, seq_q, k.shape[-2], scale * LOG2_E,
        **cfg["meta"],
    )  # fmt: skip
    return out, lse


def _backward(q, k, v, out, lse, d_out, layout: BlockLayout, scale: float):
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[-2]
    delta = (d_out.float() * out.float()).sum(dim=-1).reshape(batch * heads, seq_q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _launch_config(q, layout)
    # q/k/v/d_out are contiguous (see _FusedAttention), so dQ/dK/dV share the strides of q/k/v.
    shared = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *d_out.stride(),
        *cfg["mask_strides"],
        heads,
        seq_q,
        seq_k,
    )
    _backward_dkdv_kernel[(triton.cdiv(seq_k, layout.block_n), batch * heads)](
        q, k, v, d_out, lse, delta, dk, dv, cfg["mask"],
        layout.q_counts, layout.q_indices, layout.q_partial, layout.q_indices.shape[1],
        *shared, scale, scale * LOG2_E,
        **cfg["meta"],
    )  # fmt: skip
    _backward_dq_kernel[(triton.cdiv(seq_q, layout.block_m), batch * heads)](
        q, k, v, d_out, lse, delta, dq, cfg["mask"],
        layout.kv_counts, layout.kv_indices, layout.kv_partial, layout.kv_indices.shape[1],
        *shared, scale, scale * LOG2_E,
        **cfg["meta"],
    )  # fmt: skip
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, d_out.contiguous(), ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def _layout_for(q, k, mask, causal: bool, block_m: int, block_n: int) -> BlockLayout:
    """Reuse a caller's layout when it fits this launch, else the cached layout of its dense mask."""
    if (
        isinstance(mask, BlockLayout)
        and (mask.block_m, mask.block_n, mask.device) == (block_m, block_n, q.device)
        and (not causal or (mask.mask is None and mask.causal))
    ):
        return mask
    dense, causal = effective_mask(mask, causal)
    return block_layout(
        dense,
        seq_q=q.shape[-2],
        seq_k=k.shape[-2],
        causal=causal,
        block_m=block_m,
        block_n=block_n,
        device=q.device,
    )


def triton_attention(
    q, k, v, *, mask=None, causal=False, scale=None, block_m=BLOCK_M, block_n=BLOCK_N
) -> torch.Tensor:
    """Run the fused kernel; inputs already passed ``kernels.checks.check_inputs``."""
    if q.is_cuda == INTERPRETED:
        raise ValueError(
            f"fused_attention: got {q.device} tensors; Triton runs CUDA tensors, or CPU tensors only when "
            "TRITON_INTERPRET=1 was set before triton was imported. kernels.attention picks a path by itself."
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"fused_attention: head_dim must be one of {SUPPORTED_HEAD_DIMS} for q, k and v, "
            f"got {q.shape[-1]} and {v.shape[-1]}"
        )
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"fused_attention: {name} must be a power of two >= 16, got {size}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"fused_attention: empty sequence (seq_q={q.shape[-2]}, seq_k={k.shape[-2]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    layout = _layout_for(q, k, mask, causal, block_m, block_n)
    return _FusedAttention.apply(q, k, v, layout, scale)
