"""The Triton kernels themselves (forward, dQ, dK, dV), run on CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is imported, and in a full test run
something (DeepSpeed, another test) may already have imported it. So unless this process was started in
interpreter mode, this file holds one test that re-runs the file in a fresh Python with the variable set and
fails with the child's report if any case fails there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETING:

    def test_triton_kernels_under_the_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
        result = subprocess.run(
            command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=840
        )
        assert result.returncode == 0, (
            f"interpreter run failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
        )
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]

else:
    import kernels
    from kernels.masks import DALLE_KINDS, dalle_mask
    from kernels.reference import reference_attention

    # fp32 runs with IEEE products and fp32 accumulation: observed errors ~1e-6 against float64 at these
    # sizes, so 2e-5 is tight yet safe. fp16 is compared on the same rounded inputs, so the error is the
    # kernel's own rounding of P/dS to fp16 before products (2^-11 relative) and of the fp16 outputs and
    # gradients: ~1e-3 seen.
    TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 1e-2)}

    def _check(
        seq_q,
        seq_k,
        head_dim,
        *,
        mask=None,
        causal=False,
        dtype=torch.float32,
        block_m=16,
        block_n=16,
        batch=1,
        heads=2,
        layout_bshd=False,
    ):
        """fused_attention forward and dQ/dK/dV against the float64 reference on fresh random inputs."""
        shape_q, shape_k = (batch, heads, seq_q, head_dim), (batch, heads, seq_k, head_dim)
        q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_k)
        if layout_bshd:  # models often hold (batch, seq, heads, dim) and transpose: non-contiguous inputs
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
        out = kernels.fused_attention(q, k, v, mask=mask, causal=causal, block_m=block_m, block_n=block_n)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = reference_attention(q64, k64, v64, mask=mask, causal=causal)
        ref.backward(grad_out.double())
        out_tol, grad_tol = TOLERANCES[dtype]
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=out_tol, rtol=out_tol)
        for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(
                got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n}: {m}"
            )
        return out, q.grad, k.grad, v.grad

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("kind", DALLE_KINDS)
    def test_dalle_masks(kind, dtype):
        torch.manual_seed(10)
        # 5 text + 6x6 image = 41 tokens: a tail in the last 16-block; 3x3 conv window to keep tiles mixed.
        seq = 5 + 6 * 6
        _check(seq, seq, 16, mask=dalle_mask(5, 6, kind, kernel_size=3), dtype=dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize(
        ("seq_q", "seq_k", "head_dim"), [(37, 37, 16), (20, 45, 32), (45, 20, 16), (32, 32, 64)]
    )
    def test_causal_and_dense_with_tails_and_head_dims(seq_q, seq_k, head_dim, dtype):
        torch.manual_seed(11)
        _check(seq_q, seq_k, head_dim, causal=True, dtype=dtype)
        _check(seq_q, seq_k, head_dim, causal=False, dtype=dtype)

    def test_mask_with_causal_unequal_blocks_and_noncontiguous_inputs():
        torch.manual_seed(12)
        mask = torch.rand(50, 50) < 0.4
        _check(50, 50, 32, mask=mask, causal=True, block_m=16, block_n=32, batch=2, heads=1, layout_bshd=True)
        _check(50, 50, 16, mask=dalle_mask(1, 7, "row"), block_m=32, block_n=16)

    def test_layout_object_is_used_directly():
        torch.manual_seed(13)
        layout = kernels.block_layout(dalle_mask(5, 6, "conv", kernel_size=3), block_m=16, block_n=16)
        _check(41, 41, 16, mask=layout)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_fully_masked_rows_give_zeros(dtype):
        torch.manual_seed(14)
        mask = torch.eye(40, dtype=torch.bool)
        mask[:, :3] = True
        mask[:20] = False  # query block 0 has no tile at all; block 1 has four dead rows among live ones
        out, dq, _, _ = _check(40, 40, 16, mask=mask, dtype=dtype)
        assert (out[:, :, :20] == 0).all() and (dq[:, :, :20] == 0).all()

    def test_empty_tiles_are_never_read():
        # Keys 16..31 are masked for every query, so their tile column is empty for every query block. NaN
        # there would poison any tile the kernel loaded, even masked (0 * NaN = NaN in P @ V).
        torch.manual_seed(15)
        mask = torch.ones(48, 48, dtype=torch.bool).tril()
        mask[:, 16:32] = False
        mask[16:32, :16] = True  # keep those queries alive
        q, k, v = (torch.randn(1, 1, 48, 16, requires_grad=True) for _ in range(3))
        poisoned_k, poisoned_v = k.detach().clone(), v.detach().clone()
        poisoned_k[:, :, 16:32] = float("nan")
        poisoned_v[:, :, 16:32] = float("nan")
        out = kernels.fused_attention(q, poisoned_k, poisoned_v, mask=mask, block_m=16, block_n=16)
        clean = kernels.fused_attention(q, k, v, mask=mask, block_m=16, block_n=16)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, clean, atol=0, rtol=0)
        layout = kernels.block_layout(mask, block_m=16, block_n=16)
        assert int(layout.q_counts[1]) == 0
        assert all(1 not in layout.kv_indices[m, : layout.kv_counts[m]].tolist() for m in range(3))
