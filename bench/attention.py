"""Benchmark: Tessera's block-sparse Triton attention against SDPA and FlexAttention (needs a CUDA GPU).

For dense causal attention and each DALL-E mask, at DALL-E's shape (256 text + 32x32 image tokens, 62 heads x
64) and a long-sequence shape (256 text + 88x88 image = 8000 tokens), times forward and forward+backward of

- ``tessera``: ``kernels.fused_attention`` (the kernel ``kernels.attention`` dispatches to on a GPU);
- ``sdpa``: ``scaled_dot_product_attention``, flash backend with ``is_causal`` for dense causal, otherwise the
  dense boolean mask (what a user without a block-sparse kernel would write);
- ``flex``: compiled ``flex_attention`` with ``create_block_mask`` built from the same boolean mask.

TFLOP/s count only unmasked work: 4 * batch * heads * head_dim flops per allowed (query, key) pair forward,
2.5x that backward. Speedups are baseline time / tessera time from the same run. Writes
``bench/results/attention.json``. Usage: ``python bench/attention.py [--batch 4] [--dtype bf16]``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import fused_attention
from kernels.masks import column_major_order, dalle_mask

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MASKS = ("causal", "row", "column", "column-major", "conv")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=62)
    parser.add_argument("--head-dim", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--image-side", type=int, default=32)
    parser.add_argument("--long-batch", type=int, default=1)
    parser.add_argument("--long-heads", type=int, default=16)
    parser.add_argument("--long-image-side", type=int, default=88)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attention.json")
    return parser.parse_args(argv)


def build_mask(name: str, text_len: int, image_side: int, device) -> torch.Tensor | None:
    """Dense boolean mask for ``name`` (None for dense causal, which every method handles by index)."""
    if name == "causal":
        return None
    if name == "column-major":  # DALL-E's column attention on transposed image states (Fig. 11c)
        perm = column_major_order(text_len, image_side)
        return dalle_mask(text_len, image_side, "column")[perm][:, perm].to(device)
    return dalle_mask(text_len, image_side, name).to(device)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def make_methods(mask: torch.Tensor | None, seq: int, device) -> dict:
    """name -> attention(q, k, v) for each method, all computing the same masked attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex_attention()
    if mask is None:

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        tessera = lambda q, k, v: fused_attention(q, k, v, causal=True)
    else:

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[q_idx, kv_idx]

        tessera = lambda q, k, v: fused_attention(q, k, v, mask=mask)
    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=device)
    return {"tessera": tessera, "sdpa": sdpa, "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask)}


def time_ms(fn, q, k, v, grad_out, backward: bool) -> float:
    import triton.testing

    if not backward:
        q, k, v = q.detach(), k.detach(), v.detach()
        return triton.testing.do_bench(lambda: fn(q, k, v))
    return triton.testing.do_bench(lambda: fn(q, k, v).backward(grad_out), grad_to_none=[q, k, v])


def run_case(shape: dict, mask_name: str, dtype, device) -> list[dict]:
    batch, heads, head_dim = shape["batch"], shape["heads"], shape["head_dim"]
    text_len, image_side = shape["text_len"], shape["image_side"]
    seq = text_len + image_side**2
    mask = build_mask(mask_name, text_len, image_side, device)
    allowed = seq * (seq + 1) // 2 if mask is None else int(mask.sum())
    fwd_flops = 4 * batch * heads * head_dim * allowed
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    grad_out = torch.randn_like(q)
    methods = make_methods(mask, seq, device)
    with torch.no_grad():  # a fast wrong kernel is worth nothing: check against SDPA first
        error = (methods["tessera"](q, k, v).float() - methods["sdpa"](q, k, v).float()).abs().max().item()
    if error > 5e-2:
        raise RuntimeError(f"tessera differs from SDPA by {error:.3g} on {mask_name} at seq {seq}")
    rows = []
    for method, fn in methods.items():
        row = {"seq": seq, "batch": batch, "heads": heads, "head_dim": head_dim, "mask": mask_name}
        row |= {"density": allowed / seq**2, "method": method, "max_abs_err_vs_sdpa": error}
        for key, backward, flops in (("fwd", False, fwd_flops), ("fwd_bwd", True, 3.5 * fwd_flops)):
            try:
                ms = time_ms(fn, q, k, v, grad_out, backward)
            except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
                row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            row |= {f"{key}_ms": ms, f"{key}_tflops": flops / ms / 1e9}
        rows.append(row)
    tessera = rows[0]
    for row in rows:
        for key in ("fwd", "fwd_bwd"):
            if f"{key}_ms" in row and f"{key}_ms" in tessera:
                row[f"speedup_{key}"] = row[f"{key}_ms"] / tessera[f"{key}_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per (shape, mask, method); '-' where a method could not run (its error is in the JSON)."""
    columns = f"{'seq':>5} {'mask':>12} {'dens':>5} {'method':>8} {'fwd ms':>8} {'TF/s':>6}"
    print(columns + f" {'f+b ms':>8} {'TF/s':>6} {'tessera speedup fwd':>20} {'f+b':>6}")
    number = lambda row, key, spec: format(row[key], spec) if key in row else "-"
    for r in rows:
        print(
            f"{r['seq']:>5} {r['mask']:>12} {r['density']:>5.2f} {r['method']:>8} "
            f"{number(r, 'fwd_ms', '8.3f'):>8} {number(r, 'fwd_tflops', '6.1f'):>6} "
            f"{number(r, 'fwd_bwd_ms', '8.3f'):>8} {number(r, 'fwd_bwd_tflops', '6.1f'):>6} "
            f"{number(r, 'speedup_fwd', '.2f'):>19}x {number(r, 'speedup_fwd_bwd', '.2f'):>5}x"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); no results written.")
        return 1
    import triton

    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    shapes = [
        dict(
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            text_len=args.text_len,
            image_side=args.image_side,
        ),
        dict(
            batch=args.long_batch,
            heads=args.long_heads,
            head_dim=args.head_dim,
            text_len=args.text_len,
            image_side=args.long_image_side,
        ),
    ]
    rows = [row for shape in shapes for name in MASKS for row in run_case(shape, name, dtype, device)]
    print_table(rows)
    result = {
        "benchmark": "attention",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "flops_note": "unmasked pairs only; fwd 4*B*H*D per pair, fwd+bwd 3.5x fwd",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
