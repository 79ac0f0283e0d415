"""Counting what a judge got right, and binomial confidence intervals for the counts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from evals.scenes import CELLS, GRID, SceneObject, scene_from_metadata

# What the judge is measured on (docs/evals.md): cell occupancy, per-object colour and size, shape
# separately for large and small objects (a small object is ~5 px at 32 px, where some shapes blur
# together), object count, and relation (both related objects' cells found, which fixes the relation).
SCENE_ATTRIBUTES = ("cell", "colour", "size", "shape_large", "shape_small", "count", "relation")
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0% and 100%, unlike Wald)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def count_correct(
    scenes: Iterable[list[SceneObject]], digits: Iterable[int], metas: Iterable[dict[str, Any]]
) -> Counter[str]:
    """``{attr}_ok`` and ``{attr}_n`` counts of the judge's verdicts against ground-truth metadata."""
    counts: Counter[str] = Counter()

    def tally(name: str, ok: bool) -> None:
        counts[f"{name}_ok"] += int(ok)
        counts[f"{name}_n"] += 1

    for seen, digit, meta in zip(scenes, digits, metas):
        if meta.get("source") == "digits":
            tally("digit", digit == int(meta["label"]))
            continue
        if meta.get("source") != "synthetic":
            continue
        truth = scene_from_metadata(meta)
        found = {(o.row, o.col): o for o in seen}
        wanted = {(o.row, o.col): o for o in truth}
        for cell in range(CELLS):
            tally("cell", (divmod(cell, GRID) in found) == (divmod(cell, GRID) in wanted))
        for obj in truth:
            got = found.get((obj.row, obj.col))
            for name in ("colour", "size"):
                tally(name, got is not None and getattr(got, name) == getattr(obj, name))
            tally(f"shape_{obj.size}", got is not None and got.shape == obj.shape)
        tally("count", len(seen) == len(truth))
        if meta.get("relation"):
            pair = (truth[meta["relation"]["subject"]], truth[meta["relation"]["object"]])
            tally("relation", all((o.row, o.col) in found for o in pair))
    return counts


def accuracies(counts: Counter[str]) -> dict[str, float]:
    names = sorted(key[:-3] for key in counts if key.endswith("_ok"))
    return {name: counts[f"{name}_ok"] / counts[f"{name}_n"] for name in names if counts[f"{name}_n"]}
