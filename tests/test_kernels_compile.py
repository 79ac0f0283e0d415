"""The Triton kernels compile for real GPUs (Ampere sm_80, Hopper sm_90) on a machine without one.

The interpreter tests check the arithmetic but not the compiled path (dynamic loops over loaded block counts,
the per-tile ``if``, wgmma lowering). ``triton.compile`` with an explicit target runs the whole pipeline down
to a cubin without a device. Arguments are specialised as a real launch specialises them: unit head-dim
strides, 16-divisible pointers and strides. Runs in a child Python without ``TRITON_INTERPRET``, since under
the interpreter the kernels are not compilable objects.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

# (dtype, head_dim, has_mask, causal): the model's bf16 DALL-E masks, fp16 causal, a small dense fp16 head
CONFIGS = [("bf16", 64, True, False), ("fp16", 128, False, True), ("fp16", 32, False, False)]
TARGETS = {90: CONFIGS, 80: CONFIGS[:1]}
TILE = 64
UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mk"}  # contiguous last dims


def _compile(kernel, target, dtype: str, head_dim: int, has_mask: bool, causal: bool):
    import triton
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_M=TILE, BLOCK_N=TILE, HAS_MASK=has_mask, IS_CAUSAL=causal, PRECISION="tf32"
    )
    constexprs |= {name: 1 for name in names if name in UNIT_STRIDES}
    pointer_types = {"Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8" if has_mask else "*i32"}
    pointer_types |= dict.fromkeys(("kv_counts", "kv_indices", "q_counts", "q_indices"), "*i32")
    pointer_types |= dict.fromkeys(("kv_partial", "q_partial"), "*i8")
    pointer_types |= dict.fromkeys(("Q", "K", "V", "Out", "dO", "dQ", "dK", "dV"), f"*{dtype}")
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointer_types.get(name, "fp32" if name.startswith("scale") else "i32")
        if name in pointer_types or name.startswith("stride_"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    num_warps = 4 if head_dim <= 64 else 8
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": 3})


def compile_all() -> None:
    """Compile every kernel for every target; raises on the first failure."""
    from triton.backends.compiler import GPUTarget

    from kernels import triton_attention as kernels_module

    kernels = (
        kernels_module._forward_kernel,
        kernels_module._backward_dkdv_kernel,
        kernels_module._backward_dq_kernel,
    )
    for arch, configs in TARGETS.items():
        for config in configs:
            for kernel in kernels:
                compiled = _compile(kernel, GPUTarget("cuda", arch, 32), *config)
                assert compiled.asm.get("cubin"), f"{kernel.fn.__name__} sm_{arch} {config}: no cubin"
                print(f"sm_{arch} {kernel.fn.__name__} {config}: ok")


def test_kernels_compile_for_ampere_and_hopper():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__],
        env=env | {"OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"compile failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    assert result.stdout.count(": ok") == 3 * sum(len(configs) for configs in TARGETS.values())


if __name__ == "__main__":
    compile_all()
