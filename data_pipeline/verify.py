"""Check a dataset's shards against its manifest: presence and size from one listing, then every
shard's sha256, streamed in parallel Ray tasks (a few shards per task, so a task is worth starting).

Used by ``tessera verify`` and by an ingest rerun, which rebuilds the partitions whose shards fail.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import ray

from data_pipeline import storage
from data_pipeline.manifest import Manifest, ShardEntry, listing_problems

SHARDS_PER_TASK = 8
READ_CHUNK = 4 * 2**20


def shard_digest(url: str) -> tuple[int, str]:
    """``(bytes, sha256)`` of the object at ``url``, streamed (retried through an outage)."""
    digest = hashlib.sha256()
    size = 0
    with storage.open_resilient(url) as stream:
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _digests(urls: list[str]) -> list[tuple[int, str] | None]:
    results: list[tuple[int, str] | None] = []
    for url in urls:
        try:
            results.append(shard_digest(url))
        except FileNotFoundError:  # deleted between the listing and the read
            results.append(None)
    return results


_digests_task = ray.remote(_digests)


def shard_problems(entries: list[ShardEntry], urls: list[str]) -> dict[str, str]:
    """``{shard name: problem}`` for every shard that is missing, resized or whose sha256 differs."""
    problems = listing_problems(entries, urls)
    todo = [(entry, url) for entry, url in zip(entries, urls, strict=True) if entry.name not in problems]
    chunks = [todo[i : i + SHARDS_PER_TASK] for i in range(0, len(todo), SHARDS_PER_TASK)]
    if ray.is_initialized():
        task = _digests_task.options(runtime_env={"env_vars": storage.ray_task_env()})
        refs = [task.remote([url for _, url in chunk]) for chunk in chunks]
        answers = (ray.get(ref) for ref in refs)
    else:  # an in-process ingest's rerun: read the (few) shards here rather than start Ray
        answers = (_digests([url for _, url in chunk]) for chunk in chunks)
    for chunk, answer in zip(chunks, answers, strict=True):
        for (entry, _), result in zip(chunk, answer, strict=True):
            if result is None:
                problems[entry.name] = "missing"
            elif result[0] != entry.bytes:
                problems[entry.name] = f"{result[0]} bytes, the manifest says {entry.bytes}"
            elif result[1] != entry.sha256:
                problems[entry.name] = f"sha256 {result[1]}, the manifest says {entry.sha256}"
    return dict(sorted(problems.items()))


def verify_manifest(manifest: Manifest) -> dict[str, Any]:
    """A report of every shard checked against ``manifest`` (Ray must be initialised)."""
    started = time.perf_counter()
    problems = shard_problems(manifest.shards, manifest.shard_urls())
    return {
        "manifest": manifest.location,
        "content_id": manifest.content_id(),
        "shards": len(manifest.shards),
        "bytes": manifest.total_bytes,
        "ok": len(manifest.shards) - len(problems),
        "problems": problems,
        "seconds": round(time.perf_counter() - started, 3),
    }
