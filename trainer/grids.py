"""Image grids a person can read: every image enlarged (nearest neighbour) with its label under it.

A 32 px sample tiled at native size is a smudge in the MLflow UI, and a grid of samples without the
prompts cannot be judged at all. ``labelled_grid`` scales each image by a whole factor to at least
``min_side`` pixels (nearest, so code boundaries stay visible) and writes its label (a prompt, or
"original" / "reconstruction") in the strip below it, wrapped to the image's width.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 12  # PIL's built-in bitmap font is 11 px tall
CHAR_WIDTH = 6


def labelled_grid(
    images: torch.Tensor, labels: list[str], *, columns: int = 8, min_side: int = 128, padding: int = 4
) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [0, 1] and N labels -> one ``(1, 3, H', W')`` grid image in [0, 1]."""
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    scale = max(1, math.ceil(min_side / images.shape[-1]))
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    _, _, height, width = pixels.shape
    wrapped = [textwrap.wrap(label, max(1, width // CHAR_WIDTH))[:4] for label in labels]
    strip = LINE_HEIGHT * max((len(lines) for lines in wrapped), default=0) + padding
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = width + padding, height + strip + padding
    canvas = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, (image, lines) in enumerate(zip(pixels, wrapped)):
        left = padding + (index % columns) * cell_w
        top = padding + (index // columns) * cell_h
        canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (left, top))
        for line_number, line in enumerate(lines):
            draw.text((left, top + height + 2 + line_number * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float().div(255).unsqueeze(0)
