"""Size-targeted WebDataset tar shards, built locally and published whole.

A shard is written to a local temporary file with ``webdataset.TarWriter``, hashed, then copied to
its destination in one step, so a reader (or a resumed ingest) never sees half a shard. Fixed tar
header fields (mtime, owner, mode) make a shard's bytes, and so its sha256, a function of its samples.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile

import webdataset

from data_pipeline import storage
from data_pipeline.manifest import ShardEntry
from data_pipeline.tar_index import TAR_BLOCK, build_index, index_name

FIXED_MTIME = 0  # reproducible shards: the same samples give the same bytes on every run
TEMP_PREFIX = "tessera-shard-"  # local shards being built: tessera-shard-<pid>-<random>.tar


def shard_name(partition: int, sequence: int) -> str:
    return f"shard-{partition:05d}-{sequence:04d}.tar"


def shard_prefix(partition: int) -> str:
    return f"shard-{partition:05d}-"


def tar_member_bytes(payload_size: int) -> int:
    """A member's footprint: one header block plus its data padded to whole blocks."""
    return TAR_BLOCK + -(-payload_size // TAR_BLOCK) * TAR_BLOCK


class ShardWriter:
    """Writes ``shard-<partition>-<seq>.tar`` files under ``dest``, rolling over at either limit.

    ``max_bytes`` is a target: a shard closes before the sample that would cross it, so it overshoots
    only by tar's end-of-archive padding, or when a single sample is larger than the target.
    """

    def __init__(self, dest: str, partition: int, *, max_bytes: int, max_samples: int) -> None:
        self.dest = dest
        self.partition = partition
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.entries: list[ShardEntry] = []
        self._path: str | None = None
        self._file = None
        self._writer: webdataset.TarWriter | None = None
        self._count = 0
        self._size = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; ``members`` maps extension (``jpg``, ``txt``, ``json``) to bytes."""
        size = sum(tar_member_bytes(len(data)) for data in members.values())
        if self._writer is not None and (
            self._count >= self.max_samples or self._size + size > self.max_bytes
        ):
            self._finish()
        if self._writer is None:
            self._start()
        self._writer.write({"__key__": key, **members})
        self._count += 1
        self._size += size

    def close(self) -> list[ShardEntry]:
        if self._writer is not None:
            self._finish()
        return self.entries

    def abort(self) -> None:
        """Drop the shard being built (the partition failed; nothing partial is published)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            os.remove(self._path)
            self._writer = None

    def _start(self) -> None:
        handle, self._path = tempfile.mkstemp(suffix=".tar", prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        self._file = os.fdopen(handle, "wb")
        self._writer = webdataset.TarWriter(self._file, user="tessera", group="tessera", mtime=FIXED_MTIME)
        self._count = 0
        self._size = 0

    def _finish(self) -> None:
        self._writer.close()
        self._file.close()
        name = shard_name(self.partition, len(self.entries))
        url = storage.join(self.dest, name)
        try:
            with open(self._path, "rb") as handle:
                data = handle.read()
            digest = hashlib.sha256(data).hexdigest()
            size = len(data)
            # The index first: a published shard always has its sidecar (a crash in between leaves an
            # index without a shard, which the partition's redo overwrites).
            storage.write_bytes_atomic(
                storage.join(self.dest, index_name(name)), build_index(data, digest).to_bytes()
            )
            storage.publish_file(self._path, url)
        finally:
            os.remove(self._path)
            self._writer = None
        self.entries.append(
            ShardEntry(
                name=name,
                url=url,
                num_samples=self._count,
                bytes=size,
                sha256=digest,
                partition=self.partition,
                index=index_name(name),
            )
        )


def remove_partition_shards(dest: str, partition: int) -> None:
    """Delete shards (and their indexes) a crashed attempt at this partition may have published."""
    prefix = shard_prefix(partition)
    for url in storage.list_files(dest):
        if url.rsplit("/", 1)[-1].startswith(prefix):
            storage.remove(url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_orphan_temp_shards() -> list[str]:
    """Local shards under construction whose process is gone (a crashed or killed ingest task)."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{TEMP_PREFIX}*.tar")):
        pid = os.path.basename(path).removeprefix(TEMP_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def remove_stale_publishes(dest: str) -> list[str]:
    """``<name>.tmp-<random>`` files a crash left in a local dataset folder mid-publish (object stores
    have none: an upload is invisible until complete). Call only while no ingest writes to ``dest``."""
    if not storage.is_local(dest):
        return []
    removed = []
    for top, _, names in os.walk(dest.removeprefix("file://")):
        for name in names:
            if storage.TMP_MARK in name:
                os.remove(os.path.join(top, name))
                removed.append(os.path.join(top, name))
    return removed
