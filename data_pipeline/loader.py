"""The rank-aware, resumable training loader over a Tessera WebDataset manifest.

Assignment, order and batch counts come from ``loader_plan`` (windows of a few shards per rank, each
window's samples in a seeded permutation; a pure function of seed, epoch, world size and what was
consumed); DataLoader workers fetch one byte range per shard per window (``shard_reader``, through the
shards' member indexes; once per rank, the workers sharing it through ``window_share``), decode
JPEGs straight into a uint8 batch and collate in the worker, so the main process only receives
finished batches. The main process records which positions it has
*handed to the caller* (not what workers prefetched) as per-shard intervals: ``state_dict()`` is
exactly what the consumer saw, and any set of rank states can be merged and re-split across a
different world size without repeating or losing a sample. See docs/loader.md.

Trust nothing read: every shard is checked to exist at its recorded size (one listing) before the
first batch; a shard read whole is checked against its manifest sha256 before any of it is used;
workers die with the process that started them, and draw randomness only from seeds derived from
``(seed, epoch, rank, worker)`` (never from the trainer's torch RNG), so a resume is exact.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.loader_plan import (
    Interval,
    Positions,
    consumed_masks,
    intervals_of,
    last_use,
    merge_intervals,
    rank_batches,
    split_among_workers,
    window_reads,
)
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.shard_reader import (
    LoadedReject,
    LoadedSample,
    ShardWindow,
    load_window,
    pack_window,
    unpack_window,
)
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.window_share import WindowShare

STATE_FORMAT = "tessera-loader/1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DEFAULT_WINDOW_SHARDS = 16  # shards whose samples a rank mixes at a time (all held in memory per worker)
MAX_READ_THREADS = 8  # a window's shards are fetched concurrently, at most this many at once


class LoaderError(RuntimeError):
    """Bad input under ``strict=True``, or a loader state that does not fit this manifest."""


class _RankBatches(IterableDataset):
    """This rank's remaining batches, dealt round-robin to the DataLoader workers (plan order out)."""

    def __init__(
        self,
        manifest: Manifest,
        batches: list[tuple[int, Positions]],
        *,
        batch_size: int,
        train_size: int,
        tokenizer: Any,
        text_len: int | None,
        strict: bool,
        seeds: tuple[int, int, int],
        share_dir: str | None = None,
    ) -> None:
        self.shards = manifest.shards
        self.shard_urls = manifest.shard_urls()
        self.index_urls = [manifest.index_url(entry) for entry in manifest.shards]
        self.image_size = manifest.image_size
        self.batches = batches
        self.seeds = seeds  # (seed, epoch, rank): with the worker id, what every worker RNG is seeded from
        self.parent_pid = os.getpid()
        self.batch_size = batch_size
        self.train_size = train_size
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.strict = strict
        self.share_dir = share_dir  # where workers share window bytes (window_share); None: no sharing

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        dealt = [split_among_workers(self.batches, workers, w) for w in range(workers)]
        plans = [[positions for _, positions in batches] for batches in dealt]
        mine = dealt[worker]
        reads, last = window_reads(plans[worker]), last_use(plans[worker])
        share = None
        if self.share_dir is not None:
            # One byte range per (window, shard) for the whole rank, fetched by the first worker to need it.
            union = window_reads([positions for _, positions in self.batches])
            reads = {key: union[key] for key in reads}
            users: dict[tuple[int, int], list[int]] = {}
            for w, plan in enumerate(plans):
                for key in window_reads(plan):
                    users.setdefault(key, []).append(w)
            share = WindowShare(self.share_dir, users, worker)
        windows: dict[tuple[int, int], ShardWindow | str] = {}
        filler: LoadedSample | None = None
        for i, (index, positions) in enumerate(mine):
            images = np.empty((self.batch_size, self.train_size, self.train_size, 3), np.uint8)
            items: list[LoadedSample | LoadedReject] = []
            slot = 0  # good samples decode straight into the batch, in order
            for shard, entry, window in zip(
                positions.shard.tolist(), positions.entry.tolist(), positions.window.tolist(), strict=True
            ):
                if (window, shard) not in windows:
                    self._open_window(window, reads, windows, share)
                items.append(self._outcome(windows[(window, shard)], shard, entry, images[slot]))
                slot += isinstance(items[-1], LoadedSample)
            batch, filler = self._collate(index, items, images, filler)
            yield batch
            for key in [key for key in windows if last[key[0]] == i]:
                del windows[key]
                if share is not None:
                    share.release(key)

    def _open_window(
        self,
        window: int,
        reads: dict[tuple[int, int], tuple[int, int]],
        windows: dict[tuple[int, int], Any],
        share: WindowShare | None,
    ) -> None:
        """Fetch every shard of ``window`` this worker reads, concurrently: one byte range each (from the
        store, or from the worker of this rank that fetched it first)."""

        def load(key: tuple[int, int]) -> ShardWindow | str:
            shard = (self.shard_urls[key[1]], self.shards[key[1]], self.index_urls[key[1]])
            if share is None:
                return load_window(*shard, *reads[key])
            payload = share.get(key, lambda: pack_window(load_window(*shard, *reads[key])))
            return unpack_window(payload, *shard)

        keys = [key for key in reads if key[0] == window]
        with ThreadPoolExecutor(max_workers=max(1, min(len(keys), MAX_READ_THREADS))) as pool:
            windows.update(zip(keys, pool.map(load, keys), strict=True))

    def _outcome(
        self, source: ShardWindow | str, shard: int, entry: int, out: np.ndarray
    ) -> LoadedSample | LoadedReject:
        url = self.shard_urls[shard]
        if isinstance(source, str):  # the shard failed its sha256 check
            if self.strict:
                raise LoaderError(f"strict loader: shard {url}: checksum_mismatch ({source})")
            return LoadedReject(f"<entry {entry}>", url, "checksum_mismatch", source)
        outcome = source.outcome(entry, self.image_size, out=out, train_size=self.train_size)
        if self.strict and outcome.unsafe_members:
            raise LoaderError(
                f"strict loader: shard {url}: member {outcome.unsafe_members[0]!r}: unsafe_member"
            )
        if self.strict and isinstance(outcome, LoadedReject):
            raise LoaderError(f"strict loader: {outcome.message()}")
        return outcome

    def _collate(
        self,
        index: int,
        items: list[LoadedSample | LoadedReject],
        images: np.ndarray,
        filler: LoadedSample | None,
    ) -> tuple[dict[str, Any], LoadedSample | None]:
        """One fixed-size batch: valid samples first (already decoded into ``images`` in order), then
        padding rows (``valid=False``).

        Padding repeats this batch's own samples, else the worker's last good sample, else a black
        image with an empty caption (a rank whose share ran out before the shared batch count).
        """
        good = [item for item in items if isinstance(item, LoadedSample)]
        rejects = Counter(item.reason for item in items if isinstance(item, LoadedReject))
        rejects["unsafe_member"] += sum(len(item.unsafe_members) for item in items)
        rejects = +rejects  # drop zero counts
        pool = good or ([filler] if filler is not None else [])
        rows = good + [pool[i % len(pool)] for i in range(self.batch_size - len(good))] if pool else []
        for slot in range(len(good), len(rows)):
            images[slot] = rows[slot].image
        images[len(rows) :] = 0
        blanks = self.batch_size - len(rows)
        captions = [row.caption for row in rows] + [""] * blanks
        batch: dict[str, Any] = {
            "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
            "caption": captions,
            "valid": np.arange(self.batch_size) < len(good),
            "__key__": [row.key for row in rows] + [""] * blanks,
            "__url__": [row.url for row in rows] + [""] * blanks,
            "meta": [row.meta for row in rows] + [{}] * blanks,
            "__batch_index__": index,
            "__rejects__": dict(rejects),
        }
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer.encode_batch(captions, self.text_len).numpy()
        return batch, (good[-1] if good else filler)


# Workers send numpy arrays, turned into tensors here: pickled through the pipe they cost less than
# torch's shared-memory hand-over (a new shm segment, a copy and an fd passed over a socket per tensor).
_ARRAYS = ("image", "valid", "text")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed, distinct per tuple of ints; a worker's is (seed, epoch, rank, worker id)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (a SIGKILLed trainer leaves no orphans);
    then check the parent is still there, in case it died before the request was made."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        os._exit(0)


def _init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: die with the parent; seed every RNG from (seed, epoch, rank, worker)."""
    dataset = get_worker_info().dataset
    _die_with_parent(dataset.parent_pid)
    seed = derived_seed(*dataset.seeds, worker_id)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate step: batches are already collated, and must stay numpy (see _ARRAYS)."""
    return batch


def _resolve_tokenizer(tokenizer: Any) -> Any:
    """A ``tokenizer.json`` URL is loaded once here; workers inherit the object."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


class TesseraLoader:
    """Iterable of batches for one rank; see the module docstring and docs/loader.md.

    Every rank yields ``len(loader)`` batches of exactly ``batch_size`` rows. Call ``set_epoch`` to
    move to the next epoch; iterating again within an epoch continues with the batches not yet handed out.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        num_workers: int = 2,
        tokenizer: Any = None,
        text_len: int | None = None,
        strict: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        shuffle: bool = True,
        window_shards: int = DEFAULT_WINDOW_SHARDS,
        image_size: int | None = None,
    ) -> None:
        if tokenizer is not None and not text_len:
            raise ValueError("text_len is required when a tokenizer is given")
        if manifest.num_samples == 0:
            raise LoaderError(f"{manifest.location or 'the manifest'} lists no samples: nothing to load")
        if window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        if image_size is not None and not 0 < image_size <= manifest.image_size:
            raise ValueError(
                f"image_size must be in [1, {manifest.image_size}] (the stored size), got {image_size}"
            )
        self.manifest = manifest
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = _resolve_tokenizer(tokenizer)
        self.text_len = text_len
        self.strict = strict
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.shuffle = shuffle
        self.window_shards = window_shards
        self.image_size = image_size or manifest.image_size
        self.rejects: Counter[str] = Counter()
        self._names = [entry.name for entry in manifest.shards]
        self._counts = [entry.num_samples for entry in manifest.shards]
        problems = manifest.listing_problems()
        if problems:
            listed = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
            raise LoaderError(
                f"{manifest.location or 'the manifest'}: {len(problems)} shard(s) missing or of the "
                f"wrong size, found before the first batch: {listed}"
            )
        self._start(epoch, {})

    def _start(self, epoch: int, consumed: dict[int, list[Interval]]) -> None:
        """Fix this rank's batches for the rest of ``epoch`` given what all ranks already consumed."""
        self.epoch = epoch
        self._consumed = consumed_masks(self._counts, consumed)  # shard -> bool per entry
        self._batches = rank_batches(
            self._counts,
            seed=self.seed,
            epoch=epoch,
            consumed=consumed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            window_shards=self.window_shards,
            shuffle=self.shuffle,
        )
        self._delivered: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self._start(epoch, {})

    def __len__(self) -> int:
        return len(self._batches) - len(self._delivered)

    def reject_counts(self) -> dict[str, int]:
        """Samples (and hostile tar members) skipped so far, by reason, for logging with the step."""
        return dict(sorted(self.rejects.items()))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending = [(i, batch) for i, batch in enumerate(self._batches) if i not in self._delivered]
        workers = min(self.num_workers, len(pending))
        # Two or more workers read the same windows: one fetches each, the others read its file.
        share_dir = tempfile.mkdtemp(prefix="tessera-windows-") if workers > 1 else None
        dataset = _RankBatches(
            self.manifest,
            pending,
            batch_size=self.batch_size,
            train_size=self.image_size,
            tokenizer=self.tokenizer,
            text_len=self.text_len,
            strict=self.strict,
            seeds=(self.seed, self.epoch, self.rank),
            share_dir=share_dir,
        )
        try:
            yield from self._deliver(dataset, workers)
        finally:
            if share_dir is not None:
                shutil.rmtree(share_dir, ignore_errors=True)

    def _deliver(self, dataset: _RankBatches, workers: int) -> Iterator[dict[str, Any]]:
        if workers == 0:
            stream = iter(dataset)
        else:
            stream = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=workers,
                    prefetch_factor=self.prefetch_factor,
                    multiprocessing_context=self.multiprocessing_context,
                    collate_fn=_as_is,
                    worker_init_fn=_init_worker,
                    # Workers' base seed from a private generator: the trainer's torch RNG is not drawn.
                    generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, self.rank)),
                )
            )
        for batch in stream:
            for name in _ARRAYS:
                if name in batch:
                    batch[name] = torch.from_numpy(batch[name])
            index = batch.pop("__batch_index__")
            self.rejects.update(batch.pop("__rejects__"))
            self._record(index)
            yield batch

    def _record(self, index: int) -> None:
        """The caller now holds batch ``index``: its positions (valid or rejected) are consumed."""
        self._delivered.add(index)
        batch = self._batches[index]
        for shard in np.unique(batch.shard).tolist():
            if shard not in self._consumed:
                self._consumed[shard] = np.zeros(self._counts[shard], bool)
            self._consumed[shard][batch.entry[batch.shard == shard]] = True

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: what all ranks had consumed when this state was loaded, plus what this rank gave out."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_samples": self.manifest.num_samples,
            "consumed": {
                self._names[shard]: [list(interval) for interval in intervals_of(np.flatnonzero(mask))]
                for shard, mask in sorted(self._consumed.items())
                if mask.any()
            },
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue an epoch from one merged state (or a list of rank states, merged here), any world size."""
        state = merge_states(state) if isinstance(state, list) else merge_states([state])
        if state["num_samples"] != self.manifest.num_samples:
            raise LoaderError(
                f"loader state is for a dataset of {state['num_samples']} samples, "
                f"this manifest has {self.manifest.num_samples}"
            )
        index = {name: i for i, name in enumerate(self._names)}
        consumed: dict[int, list[Interval]] = {}
        for name, intervals in state["consumed"].items():
            if name not in index:
                raise LoaderError(f"loader state names shard '{name}', which this manifest does not list")
            limit = self._counts[index[name]]
            if any(not 0 <= lo < hi <= limit for lo, hi in intervals):
                raise LoaderError(f"loader state for shard '{name}' has positions outside [0, {limit})")
            consumed[index[name]] = [(lo, hi) for lo, hi in intervals]
        self.seed = state["seed"]
        self._start(state["epoch"], consumed)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from all ranks' states (the union of what they consumed); all must share epoch and seed."""
    if not states:
        raise LoaderError("merge_states needs at least one rank state")
    for state in states:
        if state.get("format") != STATE_FORMAT:
            raise LoaderError(f"not a {STATE_FORMAT} loader state: format={state.get('format')!r}")
    first = states[0]
    for field in ("epoch", "seed", "num_samples"):
        values = {state[field] for state in states}
        if len(values) > 1:
            raise LoaderError(f"rank states disagree on {field}: {sorted(values)}")
    consumed: dict[str, list[Interval]] = {}
    for state in states:
        for name, intervals in state["consumed"].items():
            consumed.setdefault(name, []).extend((lo, hi) for lo, hi in intervals)
    return {
        "format": STATE_FORMAT,
        "epoch": first["epoch"],
        "seed": first["seed"],
        "num_samples": first["num_samples"],
        "consumed": {
            name: [list(iv) for iv in merge_intervals(ivs)] for name, ivs in sorted(consumed.items())
        },
    }


def open_loader(
    manifest: str | Manifest,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    num_workers: int = 2,
    tokenizer: Any = None,
    text_len: int | None = None,
    strict: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
    shuffle: bool = True,
    window_shards: int = DEFAULT_WINDOW_SHARDS,
    image_size: int | None = None,
) -> TesseraLoader:
    """A loader for ``rank`` of ``world_size``; ``manifest`` is a loaded Manifest or its URL/folder.

    ``shuffle``: samples in a seeded permutation within windows of ``window_shards`` shards (False:
    tar order within each shard, shards still permuted per epoch). ``image_size``: decode to this
    size when smaller than the stored one (reduced-size JPEG decode), default the stored size."""
    if isinstance(manifest, str):
        manifest = load_manifest(manifest)
    return TesseraLoader(
        manifest,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        num_workers=num_workers,
        tokenizer=tokenizer,
        text_len=text_len,
        strict=strict,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
        shuffle=shuffle,
        window_shards=window_shards,
        image_size=image_size,
    )
