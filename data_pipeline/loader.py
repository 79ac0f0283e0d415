"""The rank-aware, resumable training loader over a Tessera WebDataset manifest.

Assignment and batch counts come from ``loader_plan`` (a seeded per-epoch shard permutation cut into
``world_size`` contiguous pieces); DataLoader workers stream their share of this rank's batches,
decode JPEGs straight to uint8 and collate in the worker, so the main process only receives finished
batches. The main process records which positions it has *handed to the caller* (not what workers
prefetched) as per-shard intervals: ``state_dict()`` is exactly what the consumer saw, and any set of
rank states can be merged and re-split across a different world size without repeating or losing a
sample. See docs/loader.md.

Trust nothing read: every shard is checked to exist at its recorded size (one listing) before the
first batch; a shard read whole is checked against its manifest sha256 before any of it is used;
workers die with the process that started them, and draw randomness only from seeds derived from
``(seed, epoch, rank, worker)`` (never from the trainer's torch RNG), so a resume is exact.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.loader_plan import (
    Interval,
    Segment,
    merge_intervals,
    rank_batches,
    read_passes,
    split_among_workers,
)
from data_pipeline.manifest import Manifest, ShardEntry, load_manifest
from data_pipeline.shard_reader import LoadedReject, LoadedSample, decode_entry, iter_entries, read_shard
from data_pipeline.tokenizer import load_tokenizer

STATE_FORMAT = "tessera-loader/1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LoaderError(RuntimeError):
    """Bad input under ``strict=True``, or a loader state that does not fit this manifest."""


class _RankBatches(IterableDataset):
    """This rank's remaining batches, dealt round-robin to the DataLoader workers (plan order out)."""

    def __init__(
        self,
        shard_urls: list[str],
        shards: list[ShardEntry],
        batches: list[tuple[int, list[Segment]]],
        *,
        batch_size: int,
        image_size: int,
        tokenizer: Any,
        text_len: int | None,
        strict: bool,
        seeds: tuple[int, int, int],
    ) -> None:
        self.shard_urls = shard_urls
        self.shards = shards
        self.batches = batches
        self.seeds = seeds  # (seed, epoch, rank): with the worker id, what every worker RNG is seeded from
        self.parent_pid = os.getpid()
        self.batch_size = batch_size
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.strict = strict

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = split_among_workers(self.batches, info.num_workers, info.id) if info else self.batches
        outcomes = self._outcomes([seg for _, segments in mine for seg in segments])
        filler: LoadedSample | None = None
        for index, segments in mine:
            items = list(itertools.islice(outcomes, sum(len(seg) for seg in segments)))
            batch, filler = self._collate(index, items, filler)
            yield batch

    def _outcomes(self, segments: list[Segment]) -> Iterator[LoadedSample | LoadedReject]:
        for shard, ranges in read_passes(segments):
            url = self.shard_urls[shard]
            entry = self.shards[shard]
            data = None
            if ranges[0][0] == 0 and ranges[-1][1] == entry.num_samples:  # read whole: verify before use
                data = read_shard(url)
                actual = hashlib.sha256(data).hexdigest()
                if actual != entry.sha256:
                    detail = f"sha256 {actual} ({len(data)} bytes), the manifest says {entry.sha256}"
                    if self.strict:
                        raise LoaderError(f"strict loader: shard {url}: checksum_mismatch ({detail})")
                    for index in (i for lo, hi in ranges for i in range(lo, hi)):
                        yield LoadedReject(f"<entry {index}>", url, "checksum_mismatch", detail)
                    continue
            for _, item in iter_entries(url, ranges, data):
                outcome = item if isinstance(item, LoadedReject) else decode_entry(item, url, self.image_size)
                if self.strict and outcome.unsafe_members:
                    raise LoaderError(
                        f"strict loader: shard {url}: member {outcome.unsafe_members[0]!r}: unsafe_member"
                    )
                if self.strict and isinstance(outcome, LoadedReject):
                    raise LoaderError(f"strict loader: {outcome.message()}")
                yield outcome

    def _collate(
        self, index: int, items: list[LoadedSample | LoadedReject], filler: LoadedSample | None
    ) -> tuple[dict[str, Any], LoadedSample | None]:
        """One fixed-size batch: valid samples first, then padding rows (``valid=False``).

        Padding repeats this batch's own samples, else the worker's last good sample, else a black
        image with an empty caption (a rank whose share ran out before the shared batch count).
        """
        good = [item for item in items if isinstance(item, LoadedSample)]
        rejects = Counter(item.reason for item in items if isinstance(item, LoadedReject))
        rejects["unsafe_member"] += sum(len(item.unsafe_members) for item in items)
        rejects = +rejects  # drop zero counts
        pool = good or ([filler] if filler is not None else [])
        rows = good + [pool[i % len(pool)] for i in range(self.batch_size - len(good))] if pool else []
        size = self.image_size
        images = np.zeros((self.batch_size, 3, size, size), dtype=np.uint8)
        for slot, row in enumerate(rows):
            images[slot] = row.image.transpose(2, 0, 1)
        blanks = self.batch_size - len(rows)
        captions = [row.caption for row in rows] + [""] * blanks
        batch: dict[str, Any] = {
            "image": images,
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
    ) -> None:
        if tokenizer is not None and not text_len:
            raise ValueError("text_len is required when a tokenizer is given")
        if manifest.num_samples == 0:
            raise LoaderError(f"{manifest.location or 'the manifest'} lists no samples: nothing to load")
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
        self.rejects: Counter[str] = Counter()
        self._names = [entry.name for entry in manifest.shards]
        self._counts = [entry.num_samples for entry in manifest.shards]
        self._urls = [manifest.shard_url(entry) for entry in manifest.shards]
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
        self._consumed = {shard: list(intervals) for shard, intervals in consumed.items()}
        self._batches = rank_batches(
            self._counts,
            seed=self.seed,
            epoch=epoch,
            consumed=consumed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
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
        dataset = _RankBatches(
            self._urls,
            self.manifest.shards,
            pending,
            batch_size=self.batch_size,
            image_size=self.manifest.image_size,
            tokenizer=self.tokenizer,
            text_len=self.text_len,
            strict=self.strict,
            seeds=(self.seed, self.epoch, self.rank),
        )
        workers = min(self.num_workers, len(pending))
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
        for seg in self._batches[index]:
            self._consumed[seg.shard] = merge_intervals(
                self._consumed.get(seg.shard, []) + [(seg.lo, seg.hi)]
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: what all ranks had consumed when this state was loaded, plus what this rank gave out."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_samples": self.manifest.num_samples,
            "consumed": {
                self._names[shard]: [list(interval) for interval in intervals]
                for shard, intervals in sorted(self._consumed.items())
                if intervals
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
) -> TesseraLoader:
    """A loader for ``rank`` of ``world_size``; ``manifest`` is a loaded Manifest or its URL/folder."""
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
    )
