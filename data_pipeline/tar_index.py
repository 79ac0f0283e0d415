"""Byte offsets of every member of a WebDataset tar, so a reader slices samples out of shard bytes.

An index lists the tar's regular members in tar order as ``(name, data offset, size)``, exactly what
Python's ``tarfile`` reports (long names and pax headers included), plus the sha256 and size of the
shard it describes, so an index never describes other bytes than the manifest's. Ingest writes one
beside each shard (``<shard>.idx.json``, named in the manifest); a shard without one (img2dataset,
plain tars, an older dataset) gets its index built from its bytes on first read and cached locally
under its sha256. Entries (samples) are grouped from member names with webdataset's own rule
(``base_plus_ext``), so entry ``i`` means the same sample whether the tar is streamed or sliced.
The index is JSON: nothing read from storage is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from webdataset.tariterators import base_plus_ext

from data_pipeline import storage

INDEX_FORMAT = "tessera-tar-index/1"
INDEX_SUFFIX = ".idx.json"
CACHE_ENV = "TESSERA_INDEX_CACHE"  # where indexes built on first read are kept (default ~/.cache/...)
TAR_BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members no sample owns


class TarIndexError(ValueError):
    """An index file that does not describe its shard (wrong format, hash or offsets)."""


@dataclass(frozen=True)
class IndexedEntry:
    """One sample's members as ``(extension, data offset, size)``, in tar order."""

    key: str
    members: tuple[tuple[str, int, int], ...]
    duplicate: str | None  # the first extension seen twice for this key
    unsafe: tuple[str, ...]  # hostile member names (absolute, ``..``) noted against this entry
    whole: bool  # False for the entry a truncated tar was cut in (or last before the cut)

    @property
    def start(self) -> int:
        return min((offset for _, offset, _ in self.members), default=0)

    @property
    def end(self) -> int:
        return max((offset + size for _, offset, size in self.members), default=0)


def is_unsafe(name: str) -> bool:
    """A member path that would land outside the extraction directory (absolute or with ``..``)."""
    return name.startswith("/") or ".." in name.split("/")


@dataclass(frozen=True)
class TarIndex:
    sha256: str
    bytes: int
    members: tuple[tuple[str, int, int], ...]  # regular members: (name, data offset, size), tar order
    truncated: str | None = None  # why the tar ends inside a member; None when every member is whole

    @cached_property
    def entries(self) -> list[IndexedEntry]:
        """Members grouped into samples: a new entry starts when the name's prefix changes; members
        with no extension belong to no sample; a hostile member belongs to none either, and is noted
        against the entry it follows (the first, if it comes first)."""
        groups: list[dict[str, Any]] = []
        pending_unsafe: list[str] = []
        for name, offset, size in self.members:
            if is_unsafe(name):
                (groups[-1]["unsafe"] if groups else pending_unsafe).append(name)
                continue
            prefix, ext = base_plus_ext(name)
            if prefix is None:
                continue
            if not groups or groups[-1]["key"] != prefix:
                groups.append({"key": prefix, "members": [], "seen": set(), "dup": None, "unsafe": []})
                if pending_unsafe:
                    groups[-1]["unsafe"] += pending_unsafe
                    pending_unsafe = []
            group, ext = groups[-1], ext.lower()
            if ext in group["seen"] and group["dup"] is None:
                group["dup"] = ext
            group["seen"].add(ext)
            group["members"].append((ext, offset, size))
        last = len(groups) - 1
        return [
            IndexedEntry(
                key=g["key"],
                members=tuple(g["members"]),
                duplicate=g["dup"],
                unsafe=tuple(g["unsafe"]),
                whole=self.truncated is None or i < last,
            )
            for i, g in enumerate(groups)
        ]

    def byte_range(self, lo: int, hi: int) -> tuple[int, int]:
        """``[start, end)`` covering the payloads of the whole entries among ``[lo, hi)``."""
        chosen = [e for e in self.entries[lo:hi] if e.whole and e.members]
        if not chosen:
            return 0, 0
        return min(e.start for e in chosen), max(e.end for e in chosen)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "sha256": self.sha256,
                "bytes": self.bytes,
                "truncated": self.truncated,
                "members": [list(member) for member in self.members],
            },
            separators=(",", ":"),
        ).encode()


def parse_index(data: bytes, *, sha256: str, size: int, where: str) -> TarIndex:
    """An index read from storage, checked to describe the shard ``(sha256, size)`` and stay inside it."""
    try:
        raw = json.loads(data)
        if raw.get("format") != INDEX_FORMAT:
            raise TarIndexError(f"format {raw.get('format')!r}, expected {INDEX_FORMAT}")
        if raw["sha256"] != sha256 or raw["bytes"] != size:
            raise TarIndexError(f"describes a shard of sha256 {raw['sha256']}, not {sha256}")
        members = tuple((str(n), int(o), int(s)) for n, o, s in raw["members"])
        truncated = raw["truncated"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TarIndexError(f"{where}: not a {INDEX_FORMAT} index of this shard: {exc}") from None
    bound = size if truncated is None else float("inf")
    if any(offset < 0 or length < 0 or offset + length > bound for _, offset, length in members):
        raise TarIndexError(f"{where}: member offsets fall outside the shard's {size} bytes")
    return TarIndex(sha256, size, members, truncated)


def build_index(data: bytes, sha256: str) -> TarIndex:
    """The index of a tar held in memory, from ``tarfile``'s headers (one pass, no payload copied)."""
    members: list[tuple[str, int, int]] = []
    truncated = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.offset_data + info.size > len(data):
                    truncated = "unexpected end of data"
                    break
                if info.isreg() and not _SKIP_META.match(info.name):
                    members.append((info.name, info.offset_data, info.size))
            else:
                # tarfile stops quietly at a cut or garbled header: a whole tar ends with a zero block.
                if data[tar.offset : tar.offset + TAR_BLOCK] != bytes(TAR_BLOCK):
                    truncated = f"no end-of-archive block at byte {tar.offset} (cut or damaged header)"
    except tarfile.TarError as exc:
        truncated = str(exc) or type(exc).__name__
    return TarIndex(sha256, len(data), tuple(members), truncated)


def index_name(shard_name: str) -> str:
    """The sidecar ingest writes beside a shard: ``shard-00000-0000.tar`` -> ``shard-00000-0000.idx.json``."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def _cache_path(sha256: str) -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "tessera", "tar-index"
    )
    return os.path.join(root, f"{sha256}{INDEX_SUFFIX}")


_MEMORY: dict[str, TarIndex] = {}  # per process: a worker loads each shard's index once
MEMORY_INDEXES = 1024  # at most this many kept (oldest dropped first): ~60 KiB each for 500-sample shards


def _keep(index: TarIndex) -> TarIndex:
    _MEMORY[index.sha256] = index
    while len(_MEMORY) > MEMORY_INDEXES:
        del _MEMORY[next(iter(_MEMORY))]
    return index


def cached_index(sha256: str, size: int, sidecar_url: str | None) -> TarIndex | None:
    """The shard's index from this process, the local cache, or its sidecar; None: build it on read.

    A sidecar or cache file that does not describe the shard is ignored (the index is rebuilt), so a
    stale or damaged index never slices the wrong bytes.
    """
    if sha256 in _MEMORY:
        return _MEMORY[sha256]
    for url in (_cache_path(sha256), sidecar_url):
        if url is None:
            continue
        try:
            index = parse_index(storage.read_bytes(url), sha256=sha256, size=size, where=url)
        except (FileNotFoundError, TarIndexError):
            continue
        return _keep(index)
    return None


def remember_index(index: TarIndex) -> None:
    """Keep an index built on first read, in this process and in the local cache (best effort)."""
    _keep(index)
    path = _cache_path(index.sha256)
    with contextlib.suppress(OSError):  # a read-only home: the next process rebuilds it
        storage.write_bytes_atomic(path, index.to_bytes())
