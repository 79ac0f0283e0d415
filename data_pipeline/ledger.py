"""A sample ledger: which samples each rank received per epoch, and proof that each came exactly once.

A sample is identified by ``(shard name, __key__)``: keys need only be unique within a shard, and the
shard *name* (not its URL) keeps the identity stable when a dataset folder is moved or read from a
different store. The expected set is read from the shards themselves (``manifest_keys``), because a
manifest lists shard counts, not keys.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Any

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_pipeline.manifest import Manifest
from data_pipeline.shard_reader import open_shard

SampleId = tuple[str, str]  # (shard name, key)


def sample_id(url: str, key: str) -> SampleId:
    return posixpath.basename(url), key


def manifest_keys(manifest: Manifest) -> set[SampleId]:
    """Every sample the manifest's shards hold, from member names alone (nothing is read out or decoded)."""
    keys: set[SampleId] = set()
    for entry in manifest.shards:
        url = manifest.shard_url(entry)
        names: list[str] = []

        def note(fname: str, names: list[str] = names) -> bool:
            names.append(fname)
            return False

        with open_shard(url) as stream:
            for _ in tar_file_iterator(stream, select_files=note):
                pass
        keys.update(sample_id(url, key) for key, _ in map(base_plus_ext, names) if key is not None)
    return keys


class SampleLedger:
    """Counts deliveries of valid samples per (epoch, rank); mergeable across ranks and runs."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], Counter[SampleId]] = {}

    def record(self, batch: dict[str, Any], *, rank: int = 0, epoch: int = 0) -> None:
        """Count the batch's valid rows (padding rows carry ``valid=False`` and are not deliveries)."""
        counter = self.counts.setdefault((epoch, rank), Counter())
        for url, key, valid in zip(batch["__url__"], batch["__key__"], batch["valid"].tolist()):
            if valid:
                counter[sample_id(url, key)] += 1

    def update(self, other: SampleLedger) -> None:
        for slot, counter in other.counts.items():
            self.counts.setdefault(slot, Counter()).update(counter)

    def delivered(self, epoch: int | None = None) -> Counter[SampleId]:
        total: Counter[SampleId] = Counter()
        for (slot_epoch, _), counter in self.counts.items():
            if epoch is None or slot_epoch == epoch:
                total.update(counter)
        return total

    def per_rank(self, epoch: int) -> dict[int, int]:
        """Valid samples each rank received in ``epoch``."""
        return {rank: sum(c.values()) for (e, rank), c in sorted(self.counts.items()) if e == epoch}

    def duplicates(self, epoch: int) -> dict[SampleId, int]:
        return {sid: n for sid, n in self.delivered(epoch).items() if n > 1}

    def missing(self, expected: set[SampleId], epoch: int) -> set[SampleId]:
        return expected - set(self.delivered(epoch))

    def unexpected(self, expected: set[SampleId], epoch: int) -> set[SampleId]:
        return set(self.delivered(epoch)) - expected

    def check_exactly_once(self, expected: set[SampleId], epoch: int) -> None:
        """Raise ``AssertionError`` naming offenders unless ``epoch`` delivered ``expected`` once each."""
        problems = {
            "missing": sorted(self.missing(expected, epoch)),
            "duplicated": sorted(self.duplicates(epoch)),
            "unexpected": sorted(self.unexpected(expected, epoch)),
        }
        found = {name: ids for name, ids in problems.items() if ids}
        if found:
            summary = "; ".join(f"{len(ids)} {name} (e.g. {ids[:3]})" for name, ids in found.items())
            raise AssertionError(f"epoch {epoch} was not exactly-once: {summary}")
