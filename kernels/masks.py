"""Boolean attention masks (True = attend) for causal and DALL-E sparse attention.

Masks are dense ``(seq, seq)`` bool tensors on the CPU, built once per shape and cached: callers ask for
them per layer per step. Treat the returned tensors as read-only (they are shared through the cache). The
fused kernel turns a mask into a block-sparse layout (:class:`BlockLayout`, built and cached in
``kernels.layout``) so it never touches the blocks a mask leaves empty.

DALL-E layout (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", Sec. 2.4 and Fig. 11; the image
patterns are the Sparse Transformer's factorised patterns, Child et al. 2019): the sequence is ``text_len``
text tokens followed by ``image_side**2`` image tokens in raster order. Image token ``i`` (0-based, raster
order) sits at row ``i // image_side`` and column ``i % image_side``.
"""

from __future__ import annotations

import functools

import torch

from kernels.layout import BlockLayout, block_layout

__all__ = ["DALLE_KINDS", "BlockLayout", "block_layout", "causal_mask", "column_major_order", "dalle_mask"]

DALLE_KINDS = ("row", "column", "conv", "full")


@functools.lru_cache(maxsize=64)
def causal_mask(n: int) -> torch.Tensor:
    """``(n, n)`` lower-triangular mask: position i attends to positions 0..i."""
    if n < 1:
        raise ValueError(f"causal_mask: n must be >= 1, got {n}")
    return torch.ones(n, n, dtype=torch.bool).tril()


def _image_pattern(image_side: int, kind: str, kernel_size: int) -> torch.Tensor:
    """``(image_side**2, image_side**2)`` image-to-image mask for ``kind``, causal in raster order."""
    n = image_side * image_side
    pos = torch.arange(n)
    query, key = pos[:, None], pos[None, :]
    earlier = key <= query
    if kind == "full":
        return earlier
    if kind == "row":
        # Fig. 11(a): the previous image_side tokens in raster order plus itself (extent image_side + 1),
        # i.e. the rest of its own row so far and the previous row from the same column on.
        return earlier & (query - key <= image_side)
    if kind == "column":
        # Fig. 11(b): earlier tokens of the same column (a stride-image_side pattern).
        return earlier & ((query - key) % image_side == 0)
    # conv, Fig. 11(d): a kernel_size x kernel_size window centred on the token, clipped at the image
    # border (no wraparound), keeping only the window positions that come earlier in raster order.
    half = kernel_size // 2
    row, col = pos // image_side, pos % image_side
    near_rows = (row[:, None] - row[None, :]).abs() <= half
    near_cols = (col[:, None] - col[None, :]).abs() <= half
    return earlier & near_rows & near_cols


@functools.lru_cache(maxsize=64)
def dalle_mask(text_len: int, image_side: int, kind: str, *, kernel_size: int = 11) -> torch.Tensor:
    """DALL-E attention mask, bool ``(text_len + image_side**2, same)``, True = attend.

    Every kind is causal and shares the text part: text token t attends to text tokens 0..t (never to image
    tokens); every image token attends to all ``text_len`` text tokens. Among image tokens, image token i
    (raster order, row r = i // s, column c = i % s, s = image_side) attends to image token j <= i when:

    - ``"full"``: always (dense causal attention).
    - ``"row"``: ``i - j <= s``, the DALL-E row mask (Fig. 11a): itself and the previous s image tokens, so
      the farthest one is the token in the same column of the previous row.
    - ``"column"``: ``(i - j) % s == 0``, the same column in the current and earlier rows (Fig. 11b; the
      paper computes this as a row mask on transposed image states, which is the same attention).
    - ``"conv"``: ``|r_i - r_j| <= k // 2`` and ``|c_i - c_j| <= k // 2`` with ``k = kernel_size`` (odd,
      11 in the paper), a causal convolutional window clipped at the image border (Fig. 11d).
    """
    if kind not in DALLE_KINDS:
        raise ValueError(f"dalle_mask: kind must be one of {DALLE_KINDS}, got {kind!r}")
    if text_len < 0 or image_side < 1:
        raise ValueError(
            f"dalle_mask: need text_len >= 0 and image_side >= 1, got {text_len=}, {image_side=}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"dalle_mask: kernel_size must be a positive odd number, got {kernel_size}")
    seq = text_len + image_side * image_side
    mask = causal_mask(seq).clone()
    mask[text_len:, text_len:] = _image_pattern(image_side, kind, kernel_size)
    return mask


@functools.lru_cache(maxsize=64)
def column_major_order(text_len: int, image_side: int) -> torch.Tensor:
    """Token permutation that keeps the text and lists the image column by column.

    In raster order the column mask touches every tile (each tile holds some token of every column), so the
    block-sparse kernel cannot skip anything. DALL-E computes column attention on transposed image states for
    this reason (Fig. 11c): with ``perm = column_major_order(...)``,
    ``attention(q[..., perm, :], k[..., perm, :], v[..., perm, :], mask=dalle_mask(...)[perm][:, perm])``
    equals ``attention(q, k, v, mask=dalle_mask(...))[..., perm, :]``, and that permuted mask is banded.
    """
    image = torch.arange(image_side * image_side).view(image_side, image_side).t().flatten()
    return torch.cat([torch.arange(text_len), text_len + image])
