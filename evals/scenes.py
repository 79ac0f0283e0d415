"""Scenes as the judge sees them: which object (shape, colour, size) occupies each 3x3 grid cell.

Why cells and not the caption's object slots: the synthetic source draws a scene's relation at random
among those its layout makes true, so one image has several correct captions ("a left of b" and "b
right of a") and its slot order cannot be recovered from pixels. What the pixels do determine is the
content of every grid cell (each object lies wholly inside its own cell, one object per cell), and from
cells follow the object count and every relation, because the source defines relations on cells
(``left of`` = smaller column). So the judge predicts cells, and everything else is derived here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_pipeline.sources.synthetic import COLOURS, GRID, SHAPES, SIZES, position_name

COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
CELLS = GRID * GRID
CELL_OF_POSITION = {position_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)}
IGNORE = -100  # cross-entropy's ignore_index: no label for this head on this sample


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def matches(self, wanted: dict[str, str]) -> bool:
        return all(getattr(self, name) == value for name, value in wanted.items())


def relation_holds(subject: SceneObject, obj: SceneObject, relation: str) -> bool:
    """The source's own definition: strict order of grid columns (left/right) or rows (above/below)."""
    return {
        "left of": subject.col < obj.col,
        "right of": subject.col > obj.col,
        "above": subject.row < obj.row,
        "below": subject.row > obj.row,
    }[relation]


def scene_from_metadata(meta: dict[str, Any]) -> list[SceneObject]:
    """Ground truth of a synthetic sample's stored metadata."""
    return [
        SceneObject(o["shape"], o["colour"], o["size"], *CELL_OF_POSITION[o["position"]])
        for o in meta["objects"]
    ]


def cell_labels(meta: dict[str, Any]) -> dict[str, list[int]]:
    """Per-cell targets: shape (0 = empty, else 1 + index), colour and size (IGNORE where empty).

    Samples that are not synthetic scenes (digits) get IGNORE everywhere, and a digit label instead.
    """
    labels = {"cell_shape": [IGNORE] * CELLS, "cell_colour": [IGNORE] * CELLS, "cell_size": [IGNORE] * CELLS}
    labels["digit"] = [int(meta["label"])] if meta.get("source") == "digits" else [IGNORE]
    if meta.get("source") != "synthetic":
        return labels
    labels["cell_shape"] = [0] * CELLS
    for obj in scene_from_metadata(meta):
        cell = obj.row * GRID + obj.col
        labels["cell_shape"][cell] = 1 + SHAPES.index(obj.shape)
        labels["cell_colour"][cell] = COLOUR_NAMES.index(obj.colour)
        labels["cell_size"][cell] = SIZE_NAMES.index(obj.size)
    return labels


def scene_from_predictions(shape: list[int], colour: list[int], size: list[int]) -> list[SceneObject]:
    """The judge's per-cell argmaxes (shape 0 = empty) as a scene."""
    return [
        SceneObject(
            SHAPES[shape[cell] - 1], COLOUR_NAMES[colour[cell]], SIZE_NAMES[size[cell]], *divmod(cell, GRID)
        )
        for cell in range(CELLS)
        if shape[cell] > 0
    ]


def vocabulary() -> dict[str, list[Any]]:
    """What the judge's heads mean; stored with a judge and compared when it is loaded."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOUR_NAMES),
        "sizes": list(SIZE_NAMES),
        "grid": [GRID],
        "digits": [str(d) for d in range(10)],
    }
