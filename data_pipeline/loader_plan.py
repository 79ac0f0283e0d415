"""Which sample positions each rank reads, as pure functions of shard counts, seed, epoch and progress.

A *position* is ``(shard index, entry index)``: the entry index counts samples in tar order, so it
needs no index file. An epoch's global order is the shards in a seeded per-epoch permutation, each
read front to back (tar is a streaming format). Whatever has already been consumed is subtracted and
the rest is cut into ``world_size`` contiguous, near-equal pieces, so a resumed run at any world size
reads every remaining position exactly once. Every rank gets the same number of batches (the largest
piece, rounded up), so no DDP rank waits forever on a collective its peers never reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Interval = tuple[int, int]  # half-open [lo, hi) entry indices within one shard


@dataclass(frozen=True)
class Segment:
    """Consecutive entries ``[lo, hi)`` of one shard."""

    shard: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation: same (seed, epoch) -> same order on every rank and every run."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def merge_intervals(intervals: list[Interval]) -> list[Interval]:
    """Sorted, non-overlapping, non-adjacent intervals covering the same positions."""
    merged: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def subtract_intervals(lo: int, hi: int, taken: list[Interval]) -> list[Interval]:
    """``[lo, hi)`` minus the merged intervals ``taken``."""
    free: list[Interval] = []
    cursor = lo
    for t_lo, t_hi in taken:
        if t_hi <= cursor or t_lo >= hi:
            continue
        if t_lo > cursor:
            free.append((cursor, t_lo))
        cursor = max(cursor, t_hi)
    if cursor < hi:
        free.append((cursor, hi))
    return free


def remaining_order(
    counts: list[int], order: list[int], consumed: dict[int, list[Interval]]
) -> list[Segment]:
    """The epoch's global order with the consumed positions taken out."""
    return [
        Segment(shard, lo, hi)
        for shard in order
        for lo, hi in subtract_intervals(0, counts[shard], consumed.get(shard, []))
    ]


def take(segments: list[Segment], count: int) -> tuple[list[Segment], list[Segment]]:
    """The first ``count`` positions of ``segments`` and the rest, cutting a segment if needed."""
    head: list[Segment] = []
    for i, seg in enumerate(segments):
        if count <= 0:
            return head, segments[i:]
        if len(seg) <= count:
            head.append(seg)
            count -= len(seg)
        else:
            cut = seg.lo + count
            return head + [Segment(seg.shard, seg.lo, cut)], [Segment(seg.shard, cut, seg.hi)] + segments[
                i + 1 :
            ]
    return head, []


def split_contiguous(segments: list[Segment], parts: int) -> list[list[Segment]]:
    """``parts`` contiguous pieces whose sizes differ by at most one position."""
    total = sum(len(seg) for seg in segments)
    pieces = []
    rest = segments
    for part in range(parts):
        piece, rest = take(rest, total // parts + (part < total % parts))
        pieces.append(piece)
    return pieces


def rank_batches(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    consumed: dict[int, list[Interval]],
    rank: int,
    world_size: int,
    batch_size: int,
) -> list[list[Segment]]:
    """This rank's batches for the rest of the epoch; each holds at most ``batch_size`` positions.

    The list has the same length on every rank; trailing batches short of ``batch_size`` (or empty)
    are filled with padding by the reader.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = remaining_order(counts, shard_order(len(counts), seed, epoch), consumed)
    pieces = split_contiguous(order, world_size)
    largest = max(sum(len(seg) for seg in piece) for piece in pieces)
    num_batches = -(-largest // batch_size)
    batches = []
    rest = pieces[rank]
    for _ in range(num_batches):
        batch, rest = take(rest, batch_size)
        batches.append(batch)
    return batches


def split_among_workers(items: list, num_workers: int, worker_id: int) -> list:
    """Worker ``worker_id``'s share, dealt round-robin: the DataLoader collects from its workers in
    turn, so batches reach the caller in plan order whatever the worker count, and a resumed run
    (a shorter plan, dealt afresh) continues exactly where the uninterrupted one would be."""
    return items[worker_id::num_workers]


def read_passes(segments: list[Segment]) -> list[tuple[int, list[Interval]]]:
    """``(shard, ranges)``: consecutive segments of one shard become one pass over its tar, so a worker
    opens each shard once and skips, undecoded, the entries dealt to other workers."""
    passes: list[tuple[int, list[Interval]]] = []
    for seg in segments:
        if not len(seg):
            continue
        if passes and passes[-1][0] == seg.shard and passes[-1][1][-1][1] <= seg.lo:
            ranges = passes[-1][1]
            if ranges[-1][1] == seg.lo:
                ranges[-1] = (ranges[-1][0], seg.hi)
            else:
                ranges.append((seg.lo, seg.hi))
        else:
            passes.append((seg.shard, [(seg.lo, seg.hi)]))
    return passes
