"""The contamination index of one manifest: fingerprints of every sample, one file per shard.

Built as one Ray task per shard and stored beside the manifest in ``contamination-index/``:
``<shard>.npz`` (numpy arrays only, read with ``allow_pickle=False``) and ``index.json`` (settings and,
per shard, the shard's sha256 from the manifest, its sample count and its decode failures by reason).
Incremental: a shard whose sha256 and settings match ``index.json`` is not read again, so a manifest
that grows re-indexes only its new shards. Judge features are included when a judge is given; a
different judge (card hash) means different features, so every shard is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from data_pipeline import storage
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.shard_reader import LoadedReject, decode_entry, iter_entries
from evals import fingerprints

log = logging.getLogger(__name__)

INDEX_DIR = "contamination-index"
INDEX_FORMAT = "tessera-contamination-index/1"


class IndexSettings(BaseModel):
    """What the fingerprints are computed with; changing any of it re-indexes every shard."""

    model_config = ConfigDict(extra="forbid")

    phash_size: int = Field(8, ge=4)  # bits = phash_size**2
    ngram: int = Field(fingerprints.NGRAM, ge=1)
    minhash_perm: int = Field(128, ge=16)
    judge: str | None = None  # sha256 of the judge's weights, when features are indexed (set by build_index)


class IndexBuildError(RuntimeError):
    """A shard that fails to decode under ``strict``."""


@dataclass
class ShardIndex:
    """Fingerprints of one shard's decodable samples, in shard order."""

    keys: np.ndarray  # (N,) str
    captions: np.ndarray  # (N,) str
    exact: np.ndarray  # (N,) S32 pixel sha256
    phash: np.ndarray  # (N, bits / 8) uint8
    pixels: np.ndarray  # (N, S, S, 3) uint8, blurred (fingerprints.blurred)
    ngram_hashes: np.ndarray  # (total,) uint64
    ngram_offsets: np.ndarray  # (N + 1,) int64
    minhash: np.ndarray  # (N, perm) uint64
    features: np.ndarray  # (N, D) float32, L2-normalised; (N, 0) without a judge

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self.__dict__)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(**{name: arrays[name] for name in cls.__dataclass_fields__})

    @classmethod
    def concatenate(cls, parts: list[ShardIndex]) -> ShardIndex:
        offsets, total = [np.zeros(1, np.int64)], 0
        for part in parts:
            offsets.append(part.ngram_offsets[1:] + total)
            total += int(part.ngram_offsets[-1])
        joined = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in cls.__dataclass_fields__
            if name != "ngram_offsets"
        }
        return cls(**joined, ngram_offsets=np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.keys)


def fingerprint_samples(
    keys: list[str],
    images: list[np.ndarray],
    captions: list[str],
    settings: IndexSettings,
    features: np.ndarray,
) -> ShardIndex:
    grams = [fingerprints.ngram_hashes(caption, settings.ngram) for caption in captions]
    bits = settings.phash_size**2 // 8
    return ShardIndex(
        keys=np.array(keys, dtype=str),
        captions=np.array(captions, dtype=str),
        exact=np.array([fingerprints.pixel_digest(image) for image in images], dtype="S32"),
        phash=np.stack([fingerprints.phash_bits(image, settings.phash_size) for image in images])
        if images
        else np.zeros((0, bits), np.uint8),
        pixels=np.stack([fingerprints.blurred(image) for image in images])
        if images
        else np.zeros((0, 1, 1, 3), np.uint8),
        ngram_hashes=np.concatenate(grams) if grams else np.zeros(0, np.uint64),
        ngram_offsets=np.concatenate([[0], np.cumsum([len(g) for g in grams])]).astype(np.int64),
        minhash=np.stack([fingerprints.minhash_signature(c, settings.minhash_perm) for c in captions])
        if captions
        else np.zeros((0, settings.minhash_perm), np.uint64),
        features=features.astype(np.float32),
    )


def read_shard(url: str, count: int, image_size: int, strict: bool) -> tuple[list, Counter[str]]:
    """Decoded samples of a shard and its failures by reason (fatal under ``strict``)."""
    samples, rejects = [], Counter()
    for _, entry in iter_entries(url, [(0, count)]):
        outcome = entry if isinstance(entry, LoadedReject) else decode_entry(entry, url, image_size)
        if isinstance(outcome, LoadedReject):
            if strict:
                raise IndexBuildError(f"strict index: {outcome.message()}")
            rejects[outcome.reason] += 1
            continue
        samples.append(outcome)
    return samples, rejects


def index_shard(
    url: str, count: int, image_size: int, settings: IndexSettings, judge: Any, strict: bool
) -> tuple[ShardIndex, Counter[str]]:
    """Fingerprints (and judge features, when ``judge`` is an extractor) of one shard."""
    samples, rejects = read_shard(url, count, image_size, strict)
    images = [s.image for s in samples]
    if judge is not None and samples:
        features = judge(np.stack(images).transpose(0, 3, 1, 2))
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    else:
        features = np.zeros((len(samples), 0), np.float32)
    index = fingerprint_samples(
        [s.key for s in samples], images, [s.caption for s in samples], settings, features
    )
    return index, rejects


def _index_task(url, dest, count, image_size, settings_json, judge_spec, strict):
    """Ray task body: index one shard, write its ``.npz`` beside the manifest, return the stats."""
    started = time.perf_counter()
    judge = None
    if judge_spec is not None:
        from evals.judge import Judge, JudgeModelConfig, judge_extractor

        model = Judge(JudgeModelConfig.model_validate(judge_spec["model"]))
        model.load_state_dict(judge_spec["state"])
        judge = judge_extractor(model)
    index, rejects = index_shard(
        url, count, image_size, IndexSettings.model_validate_json(settings_json), judge, strict
    )
    storage.write_bytes_atomic(dest, index.to_bytes())
    return {"samples": len(index), "rejects": dict(rejects), "seconds": time.perf_counter() - started}


def judge_id(judge_spec: dict[str, Any] | None) -> str | None:
    """sha256 over the judge's weights: features from another judge are other features."""
    if judge_spec is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(judge_spec["state"].items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def index_dir(manifest: Manifest) -> str:
    return storage.join(storage.parent(manifest.location), INDEX_DIR)


def read_index_meta(manifest: Manifest) -> dict[str, Any]:
    url = storage.join(index_dir(manifest), "index.json")
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def build_index(
    manifest_url: str,
    settings: IndexSettings,
    *,
    judge_spec: dict[str, Any] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Index every shard not indexed yet with these settings (Ray tasks); returns ``index.json``'s content."""
    import ray

    manifest = load_manifest(manifest_url)
    folder = index_dir(manifest)
    settings = settings.model_copy(update={"judge": judge_id(judge_spec)})
    meta = read_index_meta(manifest)
    same_settings = meta.get("settings") == settings.model_dump(mode="json")
    done = meta.get("shards", {}) if same_settings else {}
    todo = [s for s in manifest.shards if done.get(s.name, {}).get("sha256") != s.sha256]
    remote = ray.remote(num_cpus=1)(_index_task)
    judge_ref = ray.put(judge_spec) if judge_spec is not None else None
    started = time.perf_counter()
    futures = {
        remote.remote(
            manifest.shard_url(shard),
            storage.join(folder, f"{shard.name}.npz"),
            shard.num_samples,
            manifest.image_size,
            settings.model_dump_json(),
            judge_ref,
            strict,
        ): shard
        for shard in todo
    }
    shards = {name: entry for name, entry in done.items() if name in {s.name for s in manifest.shards}}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        shard = futures[ready[0]]
        stats = ray.get(ready[0])
        shards[shard.name] = {"sha256": shard.sha256, "file": f"{shard.name}.npz", **stats}
        indexed = len(futures) - len(pending)
        rate = sum(shards[futures[f].name]["samples"] for f in futures if f not in pending) / (
            time.perf_counter() - started
        )
        log.info("indexed %d/%d shards (%.0f samples/s)", indexed, len(futures), rate)
    meta = {
        "format": INDEX_FORMAT,
        "manifest_sha256": manifest.sha256(),
        "settings": settings.model_dump(mode="json"),
        "shards": dict(sorted(shards.items())),
        "reindexed": sorted(futures[f].name for f in futures),
        "samples": sum(entry["samples"] for entry in shards.values()),
        "rejects": dict(sum((Counter(entry["rejects"]) for entry in shards.values()), Counter())),
    }
    storage.write_bytes_atomic(
        storage.join(folder, "index.json"), (json.dumps(meta, indent=2) + "\n").encode()
    )
    return meta


def load_index(manifest_url: str) -> tuple[ShardIndex, dict[str, Any]]:
    """The whole manifest's fingerprints in manifest shard order; refuses a stale or missing index."""
    manifest = load_manifest(manifest_url)
    meta = read_index_meta(manifest)
    if not meta:
        raise FileNotFoundError(f"{manifest.location}: no contamination index (run `tessera eval index`)")
    stale = [s.name for s in manifest.shards if meta["shards"].get(s.name, {}).get("sha256") != s.sha256]
    if stale:
        raise RuntimeError(
            f"{manifest.location}: index is stale for shards {stale[:5]} (re-run `tessera eval index`)"
        )
    folder = index_dir(manifest)
    parts = [
        ShardIndex.from_bytes(storage.read_bytes(storage.join(folder, f"{s.name}.npz")))
        for s in manifest.shards
    ]
    return ShardIndex.concatenate(parts), meta
