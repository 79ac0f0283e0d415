"""Which sample positions each rank reads, and in what order: pure functions of shard counts, seed,
epoch, world size and the set of positions already consumed.

A *position* is ``(shard index, entry index)``, the entry index counting samples in tar order. An
epoch's *tar order* is the shards in a seeded per-epoch permutation, each front to back. It is cut
into ``world_size`` contiguous pieces (one per rank, as if nothing were consumed), and each piece into
*windows* of ``window_shards`` consecutive shards. The epoch's delivery order is the windows in turn,
each window's positions in a seeded permutation (identity with ``shuffle=False``): a rank reads only
its window's shards, and a batch mixes samples of every shard in the window. Whatever has been
consumed is then taken out of that order and the rest is cut into ``world_size`` contiguous pieces of
near-equal size. Without consumption those are exactly the ranks' own windows; after ranks have each
consumed the same number of batches (lockstep, as DDP runs), each rank's new piece is exactly the
rest of its old one, in the same order, so a same-world-size resume continues the uninterrupted
order, and any other world size still reads every remaining position exactly once. Every rank gets
the same number of batches (the largest piece, rounded up) so no DDP rank waits forever on a
collective its peers never reach.
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


@dataclass(frozen=True)
class Positions:
    """Positions in delivery order: parallel arrays of shard, entry and window indices."""

    shard: np.ndarray
    entry: np.ndarray
    window: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, item: slice) -> Positions:
        return Positions(self.shard[item], self.entry[item], self.window[item])

    @staticmethod
    def concat(parts: list[Positions]) -> Positions:
        if not parts:
            empty = np.zeros(0, np.int64)
            return Positions(empty, empty, empty)
        return Positions(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("shard", "entry", "window"))
        )


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


def intervals_of(entries: np.ndarray) -> list[Interval]:
    """Sorted entry indices (any order in) as merged half-open intervals."""
    if not len(entries):
        return []
    entries = np.unique(entries)
    breaks = np.flatnonzero(np.diff(entries) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(entries)]])
    return [(int(entries[s]), int(entries[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]


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


def piece_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` positions, differing by at most one."""
    return [total // parts + (part < total % parts) for part in range(parts)]


def epoch_windows(
    counts: list[int], *, seed: int, epoch: int, world_size: int, window_shards: int
) -> list[list[Segment]]:
    """The epoch's windows in delivery order: each rank's piece of the tar order (nothing consumed),
    cut into runs of ``window_shards`` shards; rank 0's windows first."""
    rest = [
        Segment(shard, 0, counts[shard]) for shard in shard_order(len(counts), seed, epoch) if counts[shard]
    ]
    windows = []
    for size in piece_sizes(sum(counts), world_size):
        piece, rest = take(rest, size)
        windows += [piece[i : i + window_shards] for i in range(0, len(piece), window_shards)]
    return windows


def window_order(
    window: list[Segment], *, seed: int, epoch: int, world_size: int, index: int, shuffle: bool
) -> Positions:
    """Window ``index``'s positions in delivery order: a permutation seeded by (seed, epoch, world
    size, window index), or tar order with ``shuffle=False``."""
    shard = np.concatenate([np.full(len(seg), seg.shard, np.int64) for seg in window])
    entry = np.concatenate([np.arange(seg.lo, seg.hi, dtype=np.int64) for seg in window])
    if shuffle:
        perm = np.random.default_rng([seed, epoch, world_size, index]).permutation(len(shard))
        shard, entry = shard[perm], entry[perm]
    return Positions(shard, entry, np.full(len(shard), index, np.int64))


def consumed_masks(counts: list[int], consumed: dict[int, list[Interval]]) -> dict[int, np.ndarray]:
    """Per shard with anything consumed: a boolean array over its entries."""
    masks = {}
    for shard, intervals in consumed.items():
        mask = np.zeros(counts[shard], bool)
        for lo, hi in intervals:
            mask[lo:hi] = True
        masks[shard] = mask
    return masks


def _remaining(window: list[Segment], masks: dict[int, np.ndarray]) -> int:
    return sum(
        len(seg) - int(masks[seg.shard][seg.lo : seg.hi].sum()) if seg.shard in masks else len(seg)
        for seg in window
    )


def rank_positions(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    consumed: dict[int, list[Interval]],
    rank: int,
    world_size: int,
    window_shards: int,
    shuffle: bool,
) -> tuple[Positions, int]:
    """This rank's remaining positions in delivery order, and the largest rank's count (for equal
    batch counts). Only the windows overlapping this rank's piece are permuted."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if window_shards < 1:
        raise ValueError(f"window_shards must be >= 1, got {window_shards}")
    windows = epoch_windows(
        counts, seed=seed, epoch=epoch, world_size=world_size, window_shards=window_shards
    )
    masks = consumed_masks(counts, consumed)
    left = [_remaining(window, masks) for window in windows]
    sizes = piece_sizes(sum(left), world_size)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    parts = []
    offset = 0
    for index, (window, n) in enumerate(zip(windows, left, strict=True)):
        if offset < end and offset + n > start and n:
            order = window_order(
                window, seed=seed, epoch=epoch, world_size=world_size, index=index, shuffle=shuffle
            )
            keep = np.ones(len(order), bool)
            for shard, mask in masks.items():
                sel = order.shard == shard
                keep[sel] &= ~mask[order.entry[sel]]
            order = Positions(order.shard[keep], order.entry[keep], order.window[keep])
            parts.append(order[max(start - offset, 0) : end - offset])
        offset += n
    return Positions.concat(parts), max(sizes)


def rank_batches(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    consumed: dict[int, list[Interval]],
    rank: int,
    world_size: int,
    batch_size: int,
    window_shards: int = 8,
    shuffle: bool = True,
) -> list[Positions]:
    """This rank's batches for the rest of the epoch; each holds at most ``batch_size`` positions.

    The list has the same length on every rank; trailing batches short of ``batch_size`` (or empty)
    are filled with padding by the reader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    positions, largest = rank_positions(
        counts,
        seed=seed,
        epoch=epoch,
        consumed=consumed,
        rank=rank,
        world_size=world_size,
        window_shards=window_shards,
        shuffle=shuffle,
    )
    return [positions[i * batch_size : (i + 1) * batch_size] for i in range(-(-largest // batch_size))]


def split_among_workers(items: list, num_workers: int, worker_id: int) -> list:
    """Worker ``worker_id``'s share, dealt round-robin: the DataLoader collects from its workers in
    turn, so batches reach the caller in plan order whatever the worker count, and a resumed run
    (a shorter plan, dealt afresh) continues exactly where the uninterrupted one would be."""
    return items[worker_id::num_workers]


def window_reads(batches: list[Positions]) -> dict[tuple[int, int], tuple[int, int]]:
    """``{(window, shard): (lo, hi)}``: the entry range a worker reads of each shard of each window it
    touches, so it fetches one byte range per shard per window (never one per sample)."""
    every = Positions.concat(batches)
    if not len(every):
        return {}
    keys = every.window * (int(every.shard.max()) + 1) + every.shard
    order = np.argsort(keys, kind="stable")
    _, first = np.unique(keys[order], return_index=True)
    entries = every.entry[order]
    lows, highs = np.minimum.reduceat(entries, first), np.maximum.reduceat(entries, first)
    return {
        (int(every.window[order[i]]), int(every.shard[order[i]])): (int(lo), int(hi) + 1)
        for i, lo, hi in zip(first, lows, highs, strict=True)
    }


def last_use(batches: list[Positions]) -> dict[int, int]:
    """``{window: index of the last of these batches that reads it}``: when its bytes can be dropped."""
    return {int(window): i for i, batch in enumerate(batches) for window in np.unique(batch.window)}
