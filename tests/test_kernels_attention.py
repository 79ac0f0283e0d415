"""``kernels.attention`` against the float64 reference: the SDPA path on CPU, the Triton path on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels.masks import DALLE_KINDS, column_major_order, dalle_mask
from kernels.reference import reference_attention

TEXT, SIDE = 5, 6  # 41 tokens


def _fully_masked_rows_mask(seq: int) -> torch.Tensor:
    """Rows 0..3 attend to nothing; the rest attend to the first three keys and themselves."""
    mask = torch.eye(seq, dtype=torch.bool)
    mask[:, :3] = True
    mask[:4] = False
    return mask


CASES = {
    "dense": dict(mask=None, causal=False),
    "causal": dict(mask=None, causal=True),
    **{
        f"dalle-{kind}": dict(mask=dalle_mask(TEXT, SIDE, kind, kernel_size=3), causal=False)
        for kind in DALLE_KINDS
    },
    "mask+causal": dict(
        mask=torch.rand(TEXT + SIDE**2, TEXT + SIDE**2, generator=torch.Generator().manual_seed(0)) < 0.5,
        causal=True,
    ),
    "fully-masked-rows": dict(mask=_fully_masked_rows_mask(TEXT + SIDE**2), causal=False),
    "layout-object": dict(
        mask=kernels.block_layout(dalle_mask(TEXT, SIDE, "row"), block_m=16, block_n=16), causal=False
    ),
}


def _compare(q, k, v, *, mask, causal, scale=None, out_tol, grad_tol):
    """Forward and all three gradients of ``kernels.attention`` against the float64 reference."""
    for t in (q, k, v):
        t.requires_grad_(True)
    out = kernels.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, mask=mask, causal=causal, scale=scale)
    ref.backward(grad_out.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=out_tol, rtol=out_tol)
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(
            got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_dispatch_matches_reference(case):
    torch.manual_seed(1)
    seq = TEXT + SIDE**2
    q, k, v = (torch.randn(2, 3, seq, 16) for _ in range(3))
    # fp32 SDPA on CPU: eps 1.2e-7, softmax over <= 41 keys of O(1) values; 1e-5 leaves ~100x headroom.
    out = _compare(q, k, v, **CASES[case], out_tol=1e-5, grad_tol=1e-5)
    if case == "fully-masked-rows":
        assert (out[:, :, :4] == 0).all()


def test_cpu_dispatch_custom_scale_and_cross_attention_lengths():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 9, 16)
    k, v = torch.randn(1, 2, 23, 16), torch.randn(1, 2, 23, 16)
    _compare(q, k, v, mask=torch.rand(9, 23) < 0.7, causal=False, scale=0.3, out_tol=1e-5, grad_tol=1e-5)
    _compare(*(t.detach() for t in (q, k, v)), mask=None, causal=True, out_tol=1e-5, grad_tol=1e-5)


def test_column_major_permutation_gives_the_same_attention():
    torch.manual_seed(3)
    mask, perm = dalle_mask(TEXT, SIDE, "column"), column_major_order(TEXT, SIDE)
    q, k, v = (torch.randn(1, 2, TEXT + SIDE**2, 16, dtype=torch.float64) for _ in range(3))
    raster = kernels.attention(q, k, v, mask=mask)
    permuted = kernels.attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], mask=mask[perm][:, perm])
    torch.testing.assert_close(permuted, raster[:, :, perm])


def test_bad_inputs_fail_with_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="mask shape"):
        kernels.attention(q, q, q, mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        kernels.attention(q, q, q, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="4-D"):
        kernels.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share dtype"):
        kernels.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="layout is for"):
        kernels.attention(q, q, q, mask=kernels.block_layout(seq_q=4, seq_k=4, causal=True))
    assert not kernels.fused_supported(q.half(), q.half(), q.half()), "CPU tensors take the SDPA path"
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            kernels.fused_attention(q, q, q)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")

# Tolerances for 16-bit inputs are against float64 on the *same rounded inputs*, so they only cover the
# kernel's own rounding: P and dS are rounded to the input dtype before the tensor-core products
# (relative 2^-8 for bf16, 2^-11 for fp16) and outputs are stored in that dtype; accumulation is fp32.
GPU_TOLERANCES = {torch.float16: (4e-3, 2e-2), torch.bfloat16: (3e-2, 8e-2)}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", DALLE_KINDS)
def test_gpu_dalle_shape_matches_reference(dtype, kind):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 4, 256 + 32 * 32, 64, device="cuda", dtype=dtype) for _ in range(3))
    assert kernels.fused_supported(q, k, v)
    out_tol, grad_tol = GPU_TOLERANCES[dtype]
    _compare(q, k, v, mask=dalle_mask(256, 32, kind), causal=False, out_tol=out_tol, grad_tol=grad_tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("seq", "head_dim"), [(1000, 32), (2047, 128)])
def test_gpu_causal_and_masked_rows_match_reference(dtype, seq, head_dim):
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, seq, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    out_tol, grad_tol = GPU_TOLERANCES[dtype]
    _compare(q, k, v, mask=None, causal=True, out_tol=out_tol, grad_tol=grad_tol)
    q, k, v = (t.detach() for t in (q, k, v))
    out = _compare(
        q, k, v, mask=_fully_masked_rows_mask(seq), causal=False, out_tol=out_tol, grad_tol=grad_tol
    )
    assert (out[:, :, :4] == 0).all()
