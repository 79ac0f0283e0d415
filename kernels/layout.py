"""Block-sparse layouts: which (query-block, key-block) tiles an attention mask needs, and how.

Each ``block_m x block_n`` tile of the ``(seq_q, seq_k)`` score matrix is classified as

- empty: no query of the tile attends to any key of it; the kernels never visit it;
- full: every query attends to every key and the tile lies inside the sequence; no element mask is applied;
- partial: anything else (including tiles that cross the end of the key sequence); the kernel applies the
  element mask (bounds, causal by index, or the dense boolean mask loaded from memory).

Non-empty tiles are stored CSR-style, like FlexAttention's ``kv_num_blocks``/``kv_indices``: for query block
``m``, ``kv_counts[m]`` key blocks ``kv_indices[m, :kv_counts[m]]`` in increasing order, with ``kv_partial``
flags. The transposed lists (``q_counts``/``q_indices``/``q_partial``: query blocks per key block) drive the
dK/dV backward pass. Building a layout costs a few tensor ops and a host sync, so layouts are cached: by mask
identity and version for explicit masks, by shape for mask-free (dense or causal) attention.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

EMPTY, PARTIAL, FULL = 0, 1, 2
BLOCK_M = BLOCK_N = 64  # the kernels' default tile; FLOP counts (models, planner) assume the same one


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """A mask's block-sparse layout on one device for one tile size.

    ``mask`` is the dense boolean mask with causality already folded in, or None when the attention is dense
    (``causal=False``) or purely causal (``causal=True``, decided by index inside the kernel).
    """

    seq_q: int
    seq_k: int
    block_m: int
    block_n: int
    mask: torch.Tensor | None
    causal: bool
    states: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    kv_partial: torch.Tensor
    q_counts: torch.Tensor
    q_indices: torch.Tensor
    q_partial: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.states.device

    def dense_mask(self) -> torch.Tensor | None:
        """The boolean ``(seq_q, seq_k)`` mask this layout stands for (None: every pair attends)."""
        if self.mask is not None:
            return self.mask
        if self.causal:
            return _causal_dense(self.seq_q, self.seq_k, self.device)
        return None

    def block_counts(self) -> dict[str, int]:
        """Number of empty, partial and full tiles."""
        return {
            name: int((self.states == state).sum())
            for name, state in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))
        }

    def computed_pairs(self) -> int:
        """(query, key) scores the fused kernels compute: every non-empty tile in full, masked or not.

        A partial tile costs as much as a full one (the element mask is applied after the product), so this,
        not the number of allowed pairs, is the work FLOP and MFU accounting must count.
        """
        return int((self.states != EMPTY).sum()) * self.block_m * self.block_n


def _causal_dense(seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor:
    """Top-left aligned causal mask, as ``scaled_dot_product_attention(is_causal=True)`` uses."""
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_any_all(mask: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: does any valid query attend to some key, and do all valid queries attend to all its keys.

    Rows past the end of the queries are ignored (they are never stored); columns past the end of the keys
    count as masked, so a tile crossing the key boundary is never full.
    """
    seq_q, seq_k = mask.shape
    rows, cols = _cdiv(seq_q, block_m) * block_m, _cdiv(seq_k, block_n) * block_n
    padded = torch.zeros(rows, cols, dtype=torch.bool, device=mask.device)
    padded[:seq_q, :seq_k] = mask
    tiles = padded.view(rows // block_m, block_m, cols // block_n, block_n)
    any_ = tiles.any(dim=3).any(dim=1)
    padded[seq_q:, :seq_k] = True
    all_ = tiles.all(dim=3).all(dim=1)
    return any_, all_


def _tile_states_without_mask(
    seq_q: int, seq_k: int, causal: bool, block_m: int, block_n: int, device: torch.device
) -> torch.Tensor:
    """Tile states of dense or causal attention, from tile coordinates alone (no dense mask is built)."""
    first_row = torch.arange(_cdiv(seq_q, block_m), device=device)[:, None] * block_m
    last_row = (first_row + block_m - 1).clamp(max=seq_q - 1)
    first_col = torch.arange(_cdiv(seq_k, block_n), device=device)[None, :] * block_n
    last_col = first_col + block_n - 1
    inside = last_col < seq_k
    if causal:
        any_ = last_row >= first_col
        all_ = inside & (first_row >= last_col)
    else:
        any_ = torch.ones(first_row.shape[0], first_col.shape[1], dtype=torch.bool, device=device)
        all_ = inside.expand_as(any_)
    return _states(any_, all_)


def _states(any_: torch.Tensor, all_: torch.Tensor) -> torch.Tensor:
    states = torch.full(any_.shape, EMPTY, dtype=torch.int8, device=any_.device)
    states[any_] = PARTIAL
    states[all_ & any_] = FULL
    return states


def _csr(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``states``: count of non-empty tiles, their column indices (ascending), partial flags."""
    nonempty = states != EMPTY
    counts = nonempty.sum(dim=1, dtype=torch.int32)
    # A stable sort of "is empty" puts the non-empty columns first, in increasing order.
    order = torch.sort((~nonempty).to(torch.int8), dim=1, stable=True).indices
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = order[:, :width]
    partial = (states.gather(1, order) == PARTIAL).to(torch.int8)
    return counts.contiguous(), order.to(torch.int32).contiguous(), partial.contiguous()


def _build(
    mask: torch.Tensor | None,
    seq_q: int,
    seq_k: int,
    causal: bool,
    block_m: int,
    block_n: int,
    device: torch.device,
) -> BlockLayout:
    if mask is None:
        states = _tile_states_without_mask(seq_q, seq_k, causal, block_m, block_n, device)
        folded = None
    else:
        folded = mask.to(device=device, dtype=torch.bool)
        if causal:
            folded = folded & _causal_dense(seq_q, seq_k, device)
        folded = folded.contiguous()
        states = _states(*_tile_any_all(folded, block_m, block_n))
    kv_counts, kv_indices, kv_partial = _csr(states)
    q_counts, q_indices, q_partial = _csr(states.t())
    return BlockLayout(
        seq_q=seq_q,
        seq_k=seq_k,
        block_m=block_m,
        block_n=block_n,
        mask=folded,
        causal=causal and mask is None,
        states=states,
        kv_counts=kv_counts,
        kv_indices=kv_indices,
        kv_partial=kv_partial,
        q_counts=q_counts,
        q_indices=q_indices,
        q_partial=q_partial,
    )


_PER_MASK: WeakIdKeyDictionary = WeakIdKeyDictionary()


def cached_for_mask(mask: torch.Tensor, key: tuple, build):
    """``build()`` once per (mask object, in-place version, key); entries die with the mask."""
    entries = _PER_MASK.get(mask)
    if entries is None or entries[0] != mask._version:
        entries = (mask._version, {})
        _PER_MASK[mask] = entries
    if key not in entries[1]:
        entries[1][key] = build()
    return entries[1][key]


@functools.lru_cache(maxsize=256)
def _maskless_layout(
    seq_q: int, seq_k: int, causal: bool, block_m: int, block_n: int, device: torch.device
) -> BlockLayout:
    return _build(None, seq_q, seq_k, causal, block_m, block_n, device)


def block_layout(
    mask: torch.Tensor | None = None,
    *,
    seq_q: int | None = None,
    seq_k: int | None = None,
    causal: bool = False,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """The (cached) layout of ``mask`` (bool ``(seq_q, seq_k)``, True = attend) combined with ``causal``.

    Without a mask, give ``seq_q`` and ``seq_k``. ``device`` defaults to the mask's device (CPU without one).
    """
    if block_m < 1 or block_n < 1:
        raise ValueError(
            f"block_layout: block sizes must be positive, got block_m={block_m}, block_n={block_n}"
        )
    if mask is None:
        if seq_q is None or seq_k is None or seq_q < 1 or seq_k < 1:
            raise ValueError(f"block_layout: without a mask give seq_q, seq_k >= 1 (got {seq_q}, {seq_k})")
        return _maskless_layout(seq_q, seq_k, causal, block_m, block_n, torch.device(device or "cpu"))
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"block_layout: mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    device = torch.device(device) if device is not None else mask.device
    key = ("layout", causal, block_m, block_n, device)
    return cached_for_mask(mask, key, lambda: _build(mask, *mask.shape, causal, block_m, block_n, device))
