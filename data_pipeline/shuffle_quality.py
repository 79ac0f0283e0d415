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
    front to back (``shuffle=False``) would deliver the same sample at (1.0 for that loader)."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    distinct, targets, rhos, stream_rhos, window_sizes = [], [], [], [], []
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
        in_window = {
            int(w): set(delivered.shard[delivered.window == w].tolist()) for w in np.unique(delivered.window)
        }
        window_sizes += [len(shards) for shards in in_window.values()]
        for batch in (batch for batch in batches if len(batch) == batch_size):
            distinct.append(len(np.unique(batch.shard)))
            targets.append(
                min(8, len(set().union(*(in_window[w] for w in np.unique(batch.window).tolist()))))
            )
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
        "spearman_rho": float(np.mean(rhos)),
        "spearman_rho_vs_streaming": float(np.mean(stream_rhos)),
    }
