"""Read a window of entries from one WebDataset shard and decode them to uint8 arrays, or say why not.

Entries are counted in tar order with webdataset's own member grouping (``base_plus_ext``), so the
loader can ask for entries ``[lo, hi)`` of a shard: members before ``lo`` are skipped without being
read out or decoded, and the stream is abandoned as soon as entry ``hi`` begins. Every position in
the window yields exactly one outcome, a ``LoadedSample`` or a ``LoadedReject`` with a reason, so
padding and exactly-once bookkeeping never lose count when a shard is damaged. (The names differ from
``sources.base``'s ``Sample``/``Rejected``, which are records on their way *into* a dataset.)
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_pipeline import storage

# Large reads: one GET per 16 MiB of shard instead of many small ranged requests.
READ_BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class LoadedSample:
    key: str
    url: str
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    unsafe_members: tuple[str, ...] = ()  # hostile member names seen beside this entry, dropped


@dataclass(frozen=True)
class LoadedReject:
    key: str
    url: str
    reason: str
    detail: str
    unsafe_members: tuple[str, ...] = ()

    def message(self) -> str:
        return f"shard {self.url}: sample '{self.key}': {self.reason} ({self.detail})"


class _WindowDone(Exception):
    """Raised from the member filter once entry ``hi`` begins: the rest of the tar is not needed."""


class _EntryWindow:
    """Counts entries as member names go by and selects only those inside the wanted ranges.

    A member whose path would escape the shard (absolute, ``..``) is never part of an entry, so it can
    neither split the real sample around it nor shift the count; it is noted against the entry it
    follows (the first entry, if it comes first) and counted as an ``unsafe_member`` reject.
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.hi = ranges[-1][1]
        self.index = -1
        self.prefix: str | None = None
        self.unsafe: dict[int, list[str]] = {}

    def wanted(self, index: int) -> bool:
        return any(lo <= index < hi for lo, hi in self.ranges)

    def select(self, fname: str) -> bool:
        if is_unsafe(fname):
            owner = max(self.index, 0)
            if self.wanted(owner):
                self.unsafe.setdefault(owner, []).append(fname)
            return False
        prefix, _ = base_plus_ext(fname)
        if prefix is None:  # no extension: not part of any sample (webdataset drops these too)
            return False
        if prefix != self.prefix:
            self.index += 1
            self.prefix = prefix
            if self.index >= self.hi:
                raise _WindowDone
        return self.wanted(self.index)


@functools.lru_cache(maxsize=16)
def _filesystem(pid: int, protocol: str, credentials: tuple[tuple[str, str], ...]):
    """One filesystem per (process, store): a new s3fs instance costs ~0.5 s, and instances must not
    cross a fork, hence the pid in the key; the credentials are there because tests switch stores."""
    return storage.filesystem(f"{protocol}://")[0]


def open_shard(url: str) -> IO[bytes]:
    """A sequential stream of the shard; object-store reads resume through an outage."""
    if storage.is_local(url):
        return storage.open_resilient(url)
    protocol = url.split("://", 1)[0]
    fs = _filesystem(os.getpid(), protocol, tuple(sorted(storage.credential_env().items())))
    return storage.open_resilient(url, fs, block_size=READ_BLOCK_BYTES, cache_type="readahead")


def read_shard(url: str) -> bytes:
    with open_shard(url) as stream:
        return stream.read()


def iter_entries(
    url: str, ranges: list[tuple[int, int]], data: bytes | None = None
) -> Iterator[tuple[int, dict[str, Any] | LoadedReject]]:
    """``(index, members)`` for every entry index in the sorted, disjoint ``ranges``, in one pass over
    the shard (entries between ranges are skipped undecoded); ``members`` maps extension -> bytes, plus
    ``__unsafe__`` (hostile member names dropped beside the entry) when there were any.

    ``data``: the shard's bytes when already read whole (and verified); else the shard is streamed.
    Indices the tar does not deliver (truncated or cut short) come back as ``LoadedReject('truncated_tar')``.
    """
    window = _EntryWindow(ranges)
    failure: list[str] = []

    def handler(exn: Exception) -> bool:
        if not isinstance(exn, _WindowDone):
            failure.append(str(exn).split(" @ ")[0])  # webdataset appends the stream object's repr
        return False  # stop this shard either way

    current: dict[str, Any] | None = None
    current_index = -1
    with open_shard(url) if data is None else io.BytesIO(data) as stream:
        try:
            for member in tar_file_iterator(stream, handler=handler, select_files=window.select):
                if window.index != current_index:
                    if current is not None:
                        yield current_index, _with_unsafe(current, window, current_index)
                    current, current_index = {"__key__": window.prefix}, window.index
                _, ext = base_plus_ext(member["fname"])
                ext = ext.lower()
                if ext in current:
                    current.setdefault("__duplicate__", ext)
                current[ext] = member["data"]
        except (tarfile.TarError, EOFError) as exc:
            failure.append(str(exc))
    # An entry is whole once the window has moved past it, or when the tar ended cleanly after it.
    if current is not None and (not failure or current_index < window.index):
        yield current_index, _with_unsafe(current, window, current_index)
        next_index = current_index + 1
    else:
        next_index = current_index if current is not None else 0
    detail = failure[0] if failure else "the shard has fewer entries than the manifest says"
    for index in (i for lo, hi in ranges for i in range(max(lo, next_index), hi)):
        key = current["__key__"] if current is not None and index == current_index else f"<entry {index}>"
        unsafe = tuple(window.unsafe.get(index, ()))
        yield index, LoadedReject(key, url, "truncated_tar", detail, unsafe)


def _with_unsafe(members: dict[str, Any], window: _EntryWindow, index: int) -> dict[str, Any]:
    unsafe = window.unsafe.pop(index, None)
    return {**members, "__unsafe__": tuple(unsafe)} if unsafe else members


def is_unsafe(name: str) -> bool:
    """A member path that would land outside the extraction directory (absolute or with ``..``)."""
    return name.startswith("/") or ".." in name.split("/")


def header_problem(image: Image.Image, image_size: int) -> str | None:
    """Checked from the header, before any pixel is decoded: a 10000x10000 PNG costs nothing."""
    if image.size != (image_size, image_size):
        return f"{image.size[0]}x{image.size[1]}, expected {image_size}x{image_size}"
    return None


def decode_entry(members: dict[str, Any], url: str, image_size: int) -> LoadedSample | LoadedReject:
    """JPEG straight to a uint8 (H, W, 3) array; caption and metadata checked; no float conversion."""
    key = members["__key__"]
    unsafe = members.get("__unsafe__", ())

    def reject(reason: str, detail: str) -> LoadedReject:
        return LoadedReject(key, url, reason, detail, unsafe)

    if "__duplicate__" in members:
        return reject("duplicate_member", f"two '.{members['__duplicate__']}' members")
    if "jpg" not in members:
        return reject("missing_image", "no .jpg member")
    if "txt" not in members:
        return reject("missing_caption", "no .txt member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header check decides
            with Image.open(io.BytesIO(members["jpg"])) as img:
                problem = header_problem(img, image_size)
                if problem is not None:
                    return reject("wrong_image_size", problem)
                image = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        return reject("undecodable_image", f"{type(exc).__name__}: {exc}")
    if image.shape != (image_size, image_size, 3):  # a header that lied about the size
        return reject("wrong_image_size", f"decoded {image.shape}, expected {image_size}x{image_size}")
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject("bad_caption", f"not UTF-8: {exc}")
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError as exc:
        return reject("bad_metadata", f"not JSON: {exc}")
    return LoadedSample(key, url, image, caption, meta, unsafe)
