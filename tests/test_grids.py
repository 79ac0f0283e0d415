"""trainer.grids: readable grids (enlarged images, their labels written underneath)."""

from __future__ import annotations

import pytest
import torch

from trainer.grids import labelled_grid


def test_images_enlarged_nearest_with_labels_below():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32)
    labels = ["a large red star", "", "a small blue hexagon to the left of a large white circle", "x", "y"]
    grid = labelled_grid(images, labels, columns=3, min_side=128, padding=4)
    assert grid.shape[0] == 1 and grid.shape[1] == 3
    pixels = (grid[0] * 255).round().to(torch.uint8)
    expected = (images * 255).round().to(torch.uint8)
    # 32 px -> 128 px: every source pixel is a 4x4 block (nearest), first image at (4, 4).
    first = pixels[:, 4 : 4 + 128, 4 : 4 + 128]
    assert torch.equal(first[:, ::4, ::4], expected[0])
    assert torch.equal(first[:, 3::4, 1::4], expected[0])
    # Text: dark pixels in the strip under image 0 and 2, none under the empty label (image 1).
    strip_top, strip_bottom = 4 + 128, 4 + 128 + 12
    cell = 128 + 4

    def dark_in_strip(column: int) -> int:
        left = 4 + column * cell
        return int((pixels[:, strip_top:strip_bottom, left : left + 128] < 100).all(0).sum())

    assert dark_in_strip(0) > 20 and dark_in_strip(2) > 20 and dark_in_strip(1) == 0
    # Two rows of cells; the tall label (wrapped over lines) sets the strip height of every cell.
    rows_height = grid.shape[2] - 4
    assert rows_height % 2 == 0 and rows_height // 2 > 128 + 2 * 12


def test_label_count_must_match():
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        labelled_grid(torch.rand(2, 3, 8, 8), ["one"])
