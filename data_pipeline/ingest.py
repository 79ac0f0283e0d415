"""Ingest a source into WebDataset shards + a manifest, in parallel Ray tasks, resumable after a crash.

Each Ray task reads one source partition, validates and normalises every record, drops exact
duplicates (one small actor remembers which partition claimed each pixel hash first), writes
size-targeted shards and finally a marker ``_partitions/part-<p>.json``. The manifest is written
last, from the markers, so a dataset either has a complete manifest or none. A rerun with the same
settings first removes what a crash left behind (half-published ``*.tmp-*`` files, orphaned local
temp shards), then checks every finished partition's shards (present, same size, same sha256) and
skips only the partitions that pass; the rest are redone under the same shard names. The dedup
registry starts with the hashes of the partitions kept, so a redone partition cannot re-admit them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.dedup import HashOwners, HashRegistry, claim_hashes
from data_pipeline.manifest import Manifest, ShardEntry, SourceLineage, save_manifest
from data_pipeline.prep_config import IngestConfig
from data_pipeline.shards import (
    ShardWriter,
    remove_orphan_temp_shards,
    remove_partition_shards,
    remove_stale_publishes,
)
from data_pipeline.sources import Partition, Rejected, Sample, Source, open_source
from data_pipeline.validate import clean_caption, decode, encode_jpeg, fit_square, pixel_hash
from data_pipeline.verify import shard_problems

log = logging.getLogger(__name__)

MARKER_DIR = "_partitions"
CLAIM_BATCH = 64  # samples per dedup round trip: few actor calls, little work lost to a late answer
# Settings that do not change what a partition writes, so a rerun may differ in them.
NOT_IN_FINGERPRINT = ("dest", "strict", "progress")


class IngestError(RuntimeError):
    """An ingest that cannot go on: a rejected record under strict=True, or a dest from another ingest."""


def marker_url(dest: str, partition: int) -> str:
    return storage.join(dest, MARKER_DIR, f"part-{partition:05d}.json")


def fingerprint(config: IngestConfig, lineage: dict[str, Any]) -> str:
    settings = config.model_dump(exclude=set(NOT_IN_FINGERPRINT))
    if settings["image_format"] == "jpg":  # added later: datasets written before keep their fingerprint
        del settings["image_format"]
    if settings["skip"] == 0:  # likewise
        del settings["skip"]
    return hashlib.sha256(json.dumps([settings, lineage], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """A validated sample at its final size, waiting for its dedup claim."""

    index: int
    key: str
    image: Image.Image
    caption: str
    metadata: dict[str, Any]


class PartitionIngest:
    """The work of one Ray task: records in, shards and a marker out."""

    def __init__(self, source: Source, partition: Partition, config: IngestConfig, fp: str, registry) -> None:
        self.source, self.partition, self.config, self.registry = source, partition, config, registry
        self.fingerprint = fp
        self.rejects: Counter[str] = Counter()
        self.hashes: dict[str, int] = {}
        self.records = 0
        self.writer = ShardWriter(
            config.dest,
            partition.index,
            max_bytes=config.shard_max_bytes,
            max_samples=config.shard_max_samples,
        )

    def reject(self, key: str, reason: str, detail: str) -> None:
        if self.config.strict:
            raise IngestError(f"{self.source.spec}: record {key} rejected ({reason}): {detail}")
        self.rejects[reason] += 1

    def key(self, index: int) -> str:
        return f"{self.source.kind}-{self.partition.index:05d}-{index:07d}"

    def run(self) -> dict[str, Any]:
        remove_orphan_temp_shards()  # this node's leftovers from a killed task
        remove_partition_shards(self.config.dest, self.partition.index)
        pending: list[Prepared] = []
        try:
            for index, record in self.source.read(self.partition):
                self.records += 1
                prepared = self.prepare(index, record)
                if prepared is not None:
                    pending.append(prepared)
                if len(pending) >= CLAIM_BATCH:
                    self.flush(pending)
                    pending = []
            self.flush(pending)
            entries = self.writer.close()
        except BaseException:
            self.writer.abort()
            raise
        marker = {
            "partition": self.partition.index,
            "fingerprint": self.fingerprint,
            "records": self.records,
            "num_samples": sum(entry.num_samples for entry in entries),
            "shards": [entry.model_dump() for entry in entries],
            "rejects": dict(self.rejects),
            "hashes": self.hashes,
        }
        storage.write_bytes_atomic(
            marker_url(self.config.dest, self.partition.index), json.dumps(marker).encode()
        )
        return marker

    def prepare(self, index: int, record: Sample | Rejected) -> Prepared | None:
        """Validate and normalise one record; ``None`` when it was rejected (and counted)."""
        key = self.key(index)
        if isinstance(record, Rejected):
            self.reject(key, record.reason, record.detail)
            return None
        decoded = decode(record.image, self.config.max_image_pixels)
        image = decoded
        if not isinstance(decoded, Rejected):
            image = fit_square(decoded, self.config.image_size, self.config.min_image_size)
        caption = clean_caption(record.caption)
        problem = next((outcome for outcome in (image, caption) if isinstance(outcome, Rejected)), None)
        if problem is not None:
            self.reject(key, problem.reason, problem.detail)
            return None
        metadata = {**record.metadata, "key": key, "original_size": list(decoded.size)}
        return Prepared(index, key, image, caption, metadata)

    def image_member(self, image: Image.Image) -> dict[str, bytes]:
        """``{"jpg": JPEG}``, or ``{"npy": raw uint8 (H, W, 3)}`` with ``image_format = "npy"``."""
        if self.config.image_format == "jpg":
            return {"jpg": encode_jpeg(image, self.config.jpeg_quality)}
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(image.convert("RGB"), dtype=np.uint8), allow_pickle=False)
        return {"npy": buffer.getvalue()}

    def flush(self, batch: list[Prepared]) -> None:
        """Claim the batch's pixel hashes in one actor call; write the samples this partition won."""
        digests = [pixel_hash(item.image) for item in batch]
        requests = [(digest, self.partition.index, item.index) for digest, item in zip(digests, batch)]
        claimed = claim_hashes(self.registry, requests) if requests else []
        for digest, won, item in zip(digests, claimed, batch):
            if not won:
                self.reject(item.key, "duplicate", f"pixels {digest[:12]} already ingested")
                continue
            self.hashes[digest] = item.index
            metadata = {**item.metadata, "pixel_sha256": digest}
            self.writer.write(
                item.key,
                {
                    **self.image_member(item.image),
                    "txt": item.caption.encode("utf-8"),
                    "json": json.dumps(metadata, sort_keys=True, default=str).encode("utf-8"),
                },
            )


@ray.remote
def _ingest_partition(source: Source, partition: Partition, config: IngestConfig, fp: str, registry) -> dict:
    return PartitionIngest(source, partition, config, fp, registry).run()


def _finished_markers(dest: str, fp: str) -> dict[int, dict[str, Any]]:
    markers = {}
    for url in storage.list_files(storage.join(dest, MARKER_DIR), suffix=".json"):
        marker = json.loads(storage.read_bytes(url))
        if marker.get("fingerprint") != fp:
            raise IngestError(
                f"{dest} holds partitions of a different ingest ({url} has other settings or source); "
                "use a new dest, or delete the old dataset first"
            )
        markers[marker["partition"]] = marker
    return markers


def _keep_verified(dest: str, done: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The finished partitions whose shards are all present and intact; the others lose their marker."""
    entries = [(p, ShardEntry.model_validate(e)) for p, marker in done.items() for e in marker["shards"]]
    problems = shard_problems([e for _, e in entries], [storage.join(dest, e.name) for _, e in entries])
    damaged = sorted({p for p, entry in entries if entry.name in problems})
    for p in damaged:
        names = [e.name for q, e in entries if q == p and e.name in problems]
        log.warning("partition %d is rebuilt: %s", p, "; ".join(f"{n}: {problems[n]}" for n in names))
        storage.remove(marker_url(dest, p))
    return {p: marker for p, marker in done.items() if p not in damaged}


def _run_partitions(
    source: Source,
    parts: list[Partition],
    config: IngestConfig,
    fp: str,
    done: dict[int, dict[str, Any]],
    in_process: bool = False,
) -> dict[int, dict[str, Any]]:
    owners = {digest: (p, index) for p, marker in done.items() for digest, index in marker["hashes"].items()}
    if in_process:  # one after another in this process: the same bytes as the Ray path, no Ray
        registry = HashOwners(owners)
        todo = [part for part in parts if part.index not in done]
        return {**done, **{p.index: PartitionIngest(source, p, config, fp, registry).run() for p in todo}}
    # On the driver's node: a worker node that dies must not take the dedup state with it (its
    # partitions' tasks are retried elsewhere, Ray's default max_retries=3 for a lost worker or node).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    registry = HashRegistry.options(scheduling_strategy=here).remote(owners)
    task = _ingest_partition.options(runtime_env={"env_vars": storage.ray_task_env()})
    pending = {
        task.remote(source, part, config, fp, registry): part.index
        for part in parts
        if part.index not in done
    }
    results = dict(done)
    bar = tqdm(
        total=config.num_samples,
        initial=sum(m["records"] for m in done.values()),
        unit="sample",
        desc=f"ingest {source.kind}",
        disable=not config.progress,
    )
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                results[index] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                _cancel(pending)
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                raise IngestError(f"partition {index} failed: {cause}") from cause
            bar.update(results[index]["records"])
    finally:
        bar.close()
        ray.kill(registry)
    return results


def _cancel(pending: dict) -> None:
    """Stop the other partitions and wait until they are gone, so a rerun never races them."""
    for ref in pending:
        ray.cancel(ref)
    for ref in pending:
        with contextlib.suppress(ray.exceptions.RayError, IngestError):
            ray.get(ref)


def ingest_config(config: IngestConfig, source: Source | None = None, in_process: bool = False) -> Manifest:
    """Run an ingest described by ``config`` on the Ray cluster the caller initialised, or with
    ``in_process`` its partitions one after another in this process (tiny ingests: no Ray start-up)."""
    if config.dest is None:
        raise IngestError("ingest needs a dest URL (--dest or ingest.dest)")
    if not in_process and not ray.is_initialized():
        raise IngestError("Ray is not initialised: call cluster.runtime.init_ray(address) first")
    if storage.is_local(config.dest) and "://" not in config.dest:
        # Shard URLs in the manifest must not depend on the directory the command ran from.
        config = config.model_copy(update={"dest": os.path.abspath(config.dest)})
    started = time.perf_counter()
    source = source or open_source(
        config.source,
        image_size=config.image_size,
        seed=config.seed,
        split=config.split,
        skip=config.skip,
        max_file_bytes=config.max_file_bytes,
    )
    lineage = source.lineage()
    fp = fingerprint(config, lineage)
    parts = source.partitions(config.partitions, config.num_samples)
    remove_stale_publishes(config.dest)
    remove_orphan_temp_shards()
    finished = _finished_markers(config.dest, fp)
    done = _keep_verified(config.dest, finished)
    results = _run_partitions(source, parts, config, fp, done, in_process)

    markers = [results[p.index] for p in parts]
    shards = [ShardEntry.model_validate(entry) for marker in markers for entry in marker["shards"]]
    rejects: Counter[str] = Counter()
    for marker in markers:
        rejects.update(marker["rejects"])
    seconds = time.perf_counter() - started
    processed = sum(m["records"] for p, m in results.items() if p not in done)
    manifest = Manifest(
        source=SourceLineage(
            spec=lineage["spec"],
            kind=lineage["kind"],
            seed=lineage.get("seed"),
            split=lineage.get("split", "train"),
            num_requested=config.num_samples,
        ),
        image_size=config.image_size,
        image_format=config.image_format,
        num_samples=sum(shard.num_samples for shard in shards),
        total_bytes=sum(shard.bytes for shard in shards),
        shards=shards,
        rejects=dict(sorted(rejects.items())),
        duplicates_dropped=rejects.get("duplicate", 0),
        config=config.model_dump(),
        source_info=source.info(),
        stats={
            "seconds": round(seconds, 3),
            "samples_per_s": round(processed / seconds, 1) if seconds > 0 else None,
            "partitions": len(parts),
            "partitions_resumed": len(done),
            "partitions_rebuilt": len(finished) - len(done),
        },
    )
    save_manifest(manifest, config.dest)
    log.info("ingest finished: %s", json.dumps(manifest.summary()))
    return manifest


def ingest(source: str | Source, dest_url: str, **settings: Any) -> Manifest:
    """Ingest ``source`` (a spec such as ``"synthetic"`` or a ready :class:`Source`) into ``dest_url``.

    ``settings`` are :class:`IngestConfig` fields: ``num_samples``, ``image_size``, ``partitions``,
    ``shard_max_bytes``, ``shard_max_samples``, ``seed``, ``split``, ``strict``, ...
    """
    spec = source if isinstance(source, str) else source.spec
    config = IngestConfig(source=spec, dest=dest_url, **settings)
    return ingest_config(config, None if isinstance(source, str) else source)
