"""How well the loader's plan mixes samples: distinct shards per batch, and the Spearman correlation
between the order samples are delivered in and their position in the tars (or in a shard-streaming
loader's order).

Both are computed from the plan (``loader_plan.rank_batches``), which is exactly the order the loader
delivers (tested), so no pixel is decoded. *Tar position* is a sample's index in the dataset as
written: the manifest's shards in their listed order, each front to back. A loader that streams
shards in order has rho near 1 within a shard and a batch from one or two shards; a sample-level
shuffle over a window of shards has rho near 0 and batches drawing on every shard of the window.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from data_pipeline.loader_plan import Positions, rank_batches


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two sequences without ties (positions are unique), in float64:
    the Pearson correlation of their ranks."""
    if len(x) < 2:
        return 0.0
    rx = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
    ry = np.argsort(np.argsort(y, kind="stable"), kind="stable").astype(np.float64)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator else 0.0


def uniform_distinct(fragment_sizes: list[int], batch_size: int) -> float:
    """Expected distinct shards in a batch of ``batch_size`` drawn uniformly, without replacement, from
    a window holding ``fragment_sizes`` positions of each of its shards: the ceiling of any
    sample-level shuffle inside that window (a 10-sample fragment cannot be in every batch), in
    float64 as sum over shards of 1 - P(hypergeometric draw misses the shard)."""
    total = sum(fragment_sizes)
    draw = min(batch_size, total)

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    return sum(
        1.0 - (math.exp(log_choose(total - n, draw) - log_choose(total, draw)) if total - n >= draw else 0.0)
        for n in fragment_sizes
    )


def plan_quality(
    counts: list[int],
    *,
    batch_size: int,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    window_shards: int,
    shuffle: bool = True,
) -> dict[str, Any]:
    """Mixing figures of one epoch's plan: mean distinct shards per (full) batch, the shards a rank's
    window holds at most, and Spearman rho (mean over ranks) between delivery position and tar
    position, and between delivery position and the position a loader streaming the epoch's shards
    front to back (``shuffle=False``) would deliver the same sample at (1.0 for that loader). Beside
    the issue's target, ``mean_distinct_uniform``: what uniform draws from the same windows would give
    (``uniform_distinct``), which says whether a shortfall is the shuffle's or the windows' fragments."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    distinct, targets, uniform, rhos, stream_rhos, window_sizes = [], [], [], [], [], []
    for rank in range(world_size):
        plan = {
            mixed: rank_batches(
                counts,
                seed=seed,
                epoch=epoch,
                consumed={},
                rank=rank,
                world_size=world_size,
                batch_size=batch_size,
                window_shards=window_shards,
                shuffle=mixed,
            )
            for mixed in {shuffle, False}
        }
        batches = plan[shuffle]
        delivered = Positions.concat(batches)
        in_window: dict[int, Counter[int]] = {}  # window -> {shard: its positions in the window}
        for w in np.unique(delivered.window).tolist():
            shards, sizes = np.unique(delivered.shard[delivered.window == w], return_counts=True)
            in_window[w] = Counter(dict(zip(shards.tolist(), sizes.tolist(), strict=True)))
        window_sizes += [len(shards) for shards in in_window.values()]
        for batch in (batch for batch in batches if len(batch) == batch_size):
            distinct.append(len(np.unique(batch.shard)))
            fragments = sum((in_window[w] for w in np.unique(batch.window).tolist()), Counter())
            targets.append(min(8, len(fragments)))
            uniform.append(uniform_distinct(list(fragments.values()), batch_size))
        tar_position = offsets[delivered.shard] + delivered.entry
        rhos.append(spearman_rho(np.arange(len(delivered)), tar_position))
        # The same positions as a loader streaming each shard front to back would deliver them.
        streamed = Positions.concat(plan[False])
        stream_index = np.empty(sum(counts), np.int64)
        stream_index[offsets[streamed.shard] + streamed.entry] = np.arange(len(streamed))
        stream_rhos.append(spearman_rho(np.arange(len(delivered)), stream_index[tar_position]))
    return {
        "samples": int(sum(counts)),
        "shards": len(counts),
        "world_size": world_size,
        "batch_size": batch_size,
        "window_shards": window_shards,
        "shuffle": shuffle,
        "shards_per_window_max": int(max(window_sizes, default=0)),
        "mean_distinct_shards_per_batch": float(np.mean(distinct)) if distinct else 0.0,
        # The bar, batch by batch: min(8, shards in the window(s) the batch draws from).
        "mean_distinct_target": float(np.mean(targets)) if targets else 0.0,
        # Uniform draws from the same windows: the ceiling set by the windows' fragment sizes.
        "mean_distinct_uniform": float(np.mean(uniform)) if uniform else 0.0,
        "spearman_rho": float(np.mean(rhos)),
        "spearman_rho_vs_streaming": float(np.mean(stream_rhos)),
    }
