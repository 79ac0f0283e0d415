"""DALL-E and causal masks, and the block-sparse layouts the fused kernel iterates."""

from __future__ import annotations

import pytest
import torch

from kernels.layout import block_layout
from kernels.masks import DALLE_KINDS, causal_mask, column_major_order, dalle_mask

TEXT, SIDE = 2, 3  # 2 text tokens + a 3x3 image: small enough to check by hand


def _image_keys(mask: torch.Tensor, image_token: int) -> set[int]:
    """Image tokens (raster index) that image token ``image_token`` attends to."""
    row = mask[TEXT + image_token, TEXT:]
    return set(row.nonzero().flatten().tolist())


@pytest.mark.parametrize("kind", DALLE_KINDS)
def test_dalle_mask_shape_causality_and_text_rules(kind):
    text_len, side = 7, 5
    mask = dalle_mask(text_len, side, kind)
    seq = text_len + side * side
    assert mask.shape == (seq, seq) and mask.dtype == torch.bool
    assert not mask.triu(diagonal=1).any(), "some position attends to the future"
    assert mask.diagonal().all(), "every position attends to itself"
    assert torch.equal(mask[:text_len, :text_len], causal_mask(text_len)), "text is plain causal"
    assert not mask[:text_len, text_len:].any(), "text must never see image tokens"
    assert mask[text_len:, :text_len].all(), "image tokens see every text token"


# Image grid (raster index):   0 1 2
#                              3 4 5
#                              6 7 8
HAND_CHECKED = {
    "row": {0: {0}, 3: {0, 1, 2, 3}, 4: {1, 2, 3, 4}, 8: {5, 6, 7, 8}},
    "column": {0: {0}, 4: {1, 4}, 7: {1, 4, 7}, 8: {2, 5, 8}},
    "conv": {3: {0, 1, 3}, 4: {0, 1, 2, 3, 4}, 5: {1, 2, 4, 5}, 8: {4, 5, 7, 8}},
    "full": {0: {0}, 4: {0, 1, 2, 3, 4}, 8: set(range(9))},
}


@pytest.mark.parametrize("kind", DALLE_KINDS)
def test_dalle_mask_pattern_matches_hand_checked_example(kind):
    mask = dalle_mask(TEXT, SIDE, kind, kernel_size=3)
    for token, keys in HAND_CHECKED[kind].items():
        assert _image_keys(mask, token) == keys, f"{kind}: image token {token}"


def test_conv_window_grows_with_kernel_size_and_covers_full_when_wide():
    side = 6
    small, large = (dalle_mask(3, side, "conv", kernel_size=k) for k in (3, 5))
    assert (small <= large).all() and (large & ~small).any()
    # A window of 2*side - 1 reaches every pixel from every position: conv equals dense causal.
    assert torch.equal(dalle_mask(3, side, "conv", kernel_size=2 * side - 1), dalle_mask(3, side, "full"))
    # DALL-E's own default (11x11) on the real 32x32 grid: an interior token sees 5 rows above of 11
    # columns plus the 5 pixels to its left and itself.
    real = dalle_mask(256, 32, "conv")
    interior = 256 + 16 * 32 + 16
    assert int(real[interior, 256:].sum()) == 5 * 11 + 5 + 1


def test_masks_are_cached_and_bad_arguments_fail_clearly():
    assert dalle_mask(4, 4, "row") is dalle_mask(4, 4, "row")
    assert causal_mask(9) is causal_mask(9)
    with pytest.raises(ValueError, match="kind"):
        dalle_mask(4, 4, "diagonal")
    with pytest.raises(ValueError, match="kernel_size"):
        dalle_mask(4, 4, "conv", kernel_size=4)
    with pytest.raises(ValueError, match="image_side"):
        dalle_mask(4, 0, "row")


def _tile_states_by_loop(mask: torch.Tensor, block_m: int, block_n: int) -> dict[tuple[int, int], str]:
    """Independent classification: slice each tile out of the dense mask and look at it."""
    seq_q, seq_k = mask.shape
    states = {}
    for m, r0 in enumerate(range(0, seq_q, block_m)):
        for n, c0 in enumerate(range(0, seq_k, block_n)):
            tile = mask[r0 : r0 + block_m, c0 : c0 + block_n]
            if not tile.any():
                states[m, n] = "empty"
            elif tile.all() and c0 + block_n <= seq_k:  # a tile crossing the key end needs bounds masking
                states[m, n] = "full"
            else:
                states[m, n] = "partial"
    return states


def _check_layout_against_loop(mask: torch.Tensor, block_m: int, block_n: int) -> dict[str, int]:
    layout = block_layout(mask, block_m=block_m, block_n=block_n)
    expected = _tile_states_by_loop(mask, block_m, block_n)
    counts = {name: sum(s == name for s in expected.values()) for name in ("empty", "partial", "full")}
    assert layout.block_counts() == counts
    # What FLOP accounting charges: every visited tile in full, partial or not.
    assert layout.computed_pairs() == (counts["partial"] + counts["full"]) * block_m * block_n
    num_q_blocks = -(-mask.shape[0] // block_m)
    num_k_blocks = -(-mask.shape[1] // block_n)
    for m in range(num_q_blocks):  # forward lists: key blocks per query block, ascending
        visited = [(n, expected[m, n] == "partial") for n in range(num_k_blocks) if expected[m, n] != "empty"]
        count = int(layout.kv_counts[m])
        got = list(zip(layout.kv_indices[m, :count].tolist(), layout.kv_partial[m, :count].bool().tolist()))
        assert got == visited, f"query block {m}"
    for n in range(num_k_blocks):  # transposed lists for the dK/dV pass: query blocks per key block
        visited = [(m, expected[m, n] == "partial") for m in range(num_q_blocks) if expected[m, n] != "empty"]
        count = int(layout.q_counts[n])
        got = list(zip(layout.q_indices[n, :count].tolist(), layout.q_partial[n, :count].bool().tolist()))
        assert got == visited, f"key block {n}"
    return counts


@pytest.mark.parametrize("kind", DALLE_KINDS)
@pytest.mark.parametrize(("block_m", "block_n"), [(8, 8), (16, 8)])
def test_layout_skips_exactly_the_empty_tiles_of_each_dalle_mask(kind, block_m, block_n):
    # 5 text + 7x7 image = 54 tokens: not a multiple of either block size, so tail tiles are exercised.
    _check_layout_against_loop(dalle_mask(5, 7, kind, kernel_size=3), block_m, block_n)


def test_layout_at_dalle_shape_skips_tiles():
    causal_empty = _check_layout_against_loop(dalle_mask(256, 32, "full"), 64, 64)["empty"]
    # Row and conv masks are banded in raster order: they skip many more tiles than plain causal attention.
    for kind in ("row", "conv"):
        assert _check_layout_against_loop(dalle_mask(256, 32, kind), 64, 64)["empty"] > causal_empty + 50
    # The column mask touches every causal tile in raster order; in column-major order it is banded too.
    column = dalle_mask(256, 32, "column")
    assert _check_layout_against_loop(column, 64, 64)["empty"] == causal_empty
    perm = column_major_order(256, 32)
    assert _check_layout_against_loop(column[perm][:, perm], 64, 64)["empty"] > causal_empty + 50


def test_column_major_order_turns_the_column_mask_into_a_row_like_band():
    perm = column_major_order(TEXT, SIDE)
    assert perm.tolist() == [0, 1, 2, 5, 8, 3, 6, 9, 4, 7, 10]
    permuted = dalle_mask(TEXT, SIDE, "column")[perm][:, perm]
    assert not permuted.triu(diagonal=1).any(), "still causal in the new order"
    # Column-major image position p attends to the earlier positions of its own column: p - p % SIDE .. p.
    for p in range(SIDE * SIDE):
        keys = set(permuted[TEXT + p, TEXT:].nonzero().flatten().tolist())
        assert keys == set(range(p - p % SIDE, p + 1))


@pytest.mark.parametrize(("seq_q", "seq_k"), [(37, 37), (20, 45), (45, 20), (64, 64)])
def test_maskless_causal_layout_matches_the_dense_causal_mask(seq_q, seq_k):
    from_coordinates = block_layout(seq_q=seq_q, seq_k=seq_k, causal=True, block_m=16, block_n=8)
    from_dense = block_layout(torch.ones(seq_q, seq_k, dtype=torch.bool).tril(), block_m=16, block_n=8)
    assert torch.equal(from_coordinates.states, from_dense.states)
    dense = block_layout(seq_q=seq_q, seq_k=seq_k, causal=False, block_m=16, block_n=8)
    assert dense.block_counts()["empty"] == 0


def test_layouts_are_cached_per_mask_and_rebuilt_after_in_place_change():
    mask = dalle_mask(5, 7, "row").clone()
    first = block_layout(mask, block_m=16, block_n=16)
    assert block_layout(mask, block_m=16, block_n=16) is first
    assert block_layout(mask, block_m=32, block_n=16) is not first
    mask[:, 0] = False
    rebuilt = block_layout(mask, block_m=16, block_n=16)
    assert rebuilt is not first and torch.equal(rebuilt.mask, mask)
    with pytest.raises(ValueError, match="bool"):
        block_layout(mask.float())
