"""Read windows of entries out of WebDataset shards by byte range and decode them to uint8, or say why not.

A shard's index (``tar_index``) gives every member's byte offset and size, so the loader fetches one
byte range per shard per window (one ranged GET) and slices samples out of it without parsing tar
headers. A shard read whole is checked against its manifest sha256 first; a shard with no index yet is
read whole, checked, and indexed on the way. Every position asked for yields exactly one outcome, a
``LoadedSample`` or a ``LoadedReject`` with a reason, so padding and exactly-once bookkeeping never
lose count when a shard is damaged. (The names differ from ``sources.base``'s ``Sample``/``Rejected``,
which are records on their way *into* a dataset.)

JPEGs decode with libjpeg-turbo through ``simplejpeg`` (PIL when it is missing, and for anything it
refuses, so what is rejected is what PIL rejects), straight into the caller's preallocated uint8 slot,
and at a reduced DCT scale when the training size is smaller than the stored one. A ``.npy`` image
(ingest's ``image_format = "npy"``) is raw uint8 pixels: no decode at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

from data_pipeline import storage
from data_pipeline.manifest import ShardEntry
from data_pipeline.tar_index import TarIndex, build_index, cached_index, remember_index

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything, slower
    simplejpeg = None

# Large reads: one GET per 16 MiB of a streamed shard instead of many small ranged requests.
READ_BLOCK_BYTES = 16 * 2**20
JPEG_MAGIC = b"\xff\xd8"
IMAGE_EXTS = ("jpg", "npy")


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


def open_shard(url: str) -> IO[bytes]:
    """A sequential stream of the shard; object-store reads resume through an outage."""
    if storage.is_local(url):
        return storage.open_resilient(url)
    return storage.open_resilient(url, block_size=READ_BLOCK_BYTES, cache_type="readahead")


def read_shard(url: str) -> bytes:
    with open_shard(url) as stream:
        return stream.read()


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` in one ranged read (retried through an outage)."""
    if end <= start:
        return b""
    if storage.is_local(url):
        with open(url.removeprefix("file://"), "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)
    fs, path = storage.filesystem(url)
    return storage.retrying(lambda: fs.cat_file(path, start=start, end=end), f"read {url} [{start}, {end})")


class ShardWindow:
    """Bytes ``[base, base + len(data))`` of one shard and its index: entries sliced out, no tar parsing."""

    def __init__(self, url: str, index: TarIndex, data: bytes, base: int) -> None:
        self.url, self.index, self.data, self.base = url, index, data, base

    def members(self, i: int) -> dict[str, Any] | LoadedReject:
        """Entry ``i`` as ``{"__key__", ext: bytes, ...}`` (plus ``__duplicate__``/``__unsafe__`` when
        there were any), or ``truncated_tar`` when the tar does not deliver it whole."""
        entries = self.index.entries
        if i >= len(entries) or not entries[i].whole:
            key = entries[i].key if i < len(entries) else f"<entry {i}>"
            unsafe = entries[i].unsafe if i < len(entries) else ()
            detail = self.index.truncated or "the shard has fewer entries than the manifest says"
            return LoadedReject(key, self.url, "truncated_tar", detail, unsafe)
        entry = entries[i]
        members: dict[str, Any] = {"__key__": entry.key}
        for ext, offset, size in entry.members:
            members[ext] = self.data[offset - self.base : offset - self.base + size]
        if entry.duplicate:
            members["__duplicate__"] = entry.duplicate
        if entry.unsafe:
            members["__unsafe__"] = entry.unsafe
        return members

    def outcome(
        self, i: int, image_size: int, *, out: np.ndarray | None = None, train_size: int | None = None
    ) -> LoadedSample | LoadedReject:
        members = self.members(i)
        if isinstance(members, LoadedReject):
            return members
        return decode_entry(members, self.url, image_size, out=out, train_size=train_size)


def load_window(url: str, entry: ShardEntry, index_url: str | None, lo: int, hi: int) -> ShardWindow | str:
    """Entries ``[lo, hi)`` of a shard, read as one byte range; the shard is read whole (and checked
    against the manifest sha256) when the window covers it or when it has no index yet, which is
    then built and cached. Returns the checksum problem as a string instead when the check fails."""
    index = cached_index(entry.sha256, entry.bytes, index_url)
    if index is None or (lo == 0 and hi >= entry.num_samples):
        data = read_shard(url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            return f"sha256 {actual} ({len(data)} bytes), the manifest says {entry.sha256}"
        if index is None:
            index = build_index(data, actual)
            remember_index(index)
        return ShardWindow(url, index, data, 0)
    start, end = index.byte_range(lo, hi)
    return ShardWindow(url, index, read_range(url, start, end), start)


def pack_window(window: ShardWindow | str) -> bytes:
    """A loaded window (or its checksum problem) as bytes another DataLoader worker unpacks
    (``window_share``): the shard's bytes are fetched and checked once per rank, not once per worker."""
    if isinstance(window, str):
        return b"X" + window.encode()
    return b"W" + window.base.to_bytes(8, "little") + window.data


def unpack_window(payload: bytes, url: str, entry: ShardEntry, index_url: str | None) -> ShardWindow | str:
    if payload[:1] == b"X":
        return payload[1:].decode()
    base, data = int.from_bytes(payload[1:9], "little"), payload[9:]
    index = cached_index(entry.sha256, entry.bytes, index_url)
    if index is None:  # the fetcher built it from the whole shard, but could not cache it on disk
        index = build_index(data, entry.sha256)
        remember_index(index)
    return ShardWindow(url, index, data, base)


def iter_entries(
    url: str, ranges: list[tuple[int, int]]
) -> Iterator[tuple[int, dict[str, Any] | LoadedReject]]:
    """``(index, members)`` for every entry index in the sorted, disjoint ``ranges`` of a shard read
    whole (no manifest: its index is built from, or cached under, the bytes' own sha256)."""
    data = read_shard(url)
    digest = hashlib.sha256(data).hexdigest()
    index = cached_index(digest, len(data), None)
    if index is None:
        index = build_index(data, digest)
        remember_index(index)
    window = ShardWindow(url, index, data, 0)
    for i in (i for lo, hi in ranges for i in range(lo, hi)):
        yield i, window.members(i)


def header_problem(size: tuple[int, int], image_size: int) -> str | None:
    """Checked from the header (``(width, height)``), before any pixel is decoded: a 10000x10000 PNG
    costs nothing."""
    if size != (image_size, image_size):
        return f"{size[0]}x{size[1]}, expected {image_size}x{image_size}"
    return None


def _fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """A DCT-reduced decode not exactly at the training size: resized the rest of the way."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def _decode_turbo(
    data: bytes, image_size: int, out: np.ndarray | None, train_size: int
) -> np.ndarray | tuple[str, str] | None:
    """libjpeg-turbo via simplejpeg; None when it declines (PIL then decides, and rejects as before)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        problem = header_problem((width, height), image_size)
        if problem is not None:
            return "wrong_image_size", problem
        if train_size == image_size:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        # Power-of-two DCT scales only, as PIL's draft: turbo's M/8 scales (3/8...) alias visibly.
        scaled = image_size
        while scaled % 2 == 0 and scaled // 2 >= train_size and image_size // (scaled // 2) <= 8:
            scaled //= 2
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=scaled, min_width=scaled)
        return _fit(pixels, train_size)
    except ValueError:
        return None


def _decode_pil(data: bytes, image_size: int, train_size: int) -> np.ndarray | tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header check decides
            with Image.open(io.BytesIO(data)) as img:
                problem = header_problem(img.size, image_size)
                if problem is not None:
                    return "wrong_image_size", problem
                if train_size < image_size:
                    img.draft("RGB", (train_size, train_size))  # DCT scaling for JPEG; no-op otherwise
                pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        return "undecodable_image", f"{type(exc).__name__}: {exc}"
    if pixels.shape != (image_size, image_size, 3) and train_size == image_size:  # a lying header
        return "wrong_image_size", f"decoded {pixels.shape}, expected {image_size}x{image_size}"
    return _fit(pixels, train_size)


def _decode_npy(data: bytes, image_size: int, train_size: int) -> np.ndarray | tuple[str, str]:
    """Raw uint8 pixels stored by ingest (``.npy``, never unpickled)."""
    try:
        pixels = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError for bad headers
        return "undecodable_image", f"{type(exc).__name__}: {exc}"
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return "undecodable_image", f"npy of {pixels.dtype} {pixels.shape}, expected uint8 (H, W, 3)"
    problem = header_problem((pixels.shape[1], pixels.shape[0]), image_size)
    if problem is not None:
        return "wrong_image_size", problem
    return _fit(pixels, train_size)


def decode_image(
    data: bytes,
    image_size: int,
    *,
    out: np.ndarray | None = None,
    train_size: int | None = None,
    npy: bool = False,
) -> np.ndarray | tuple[str, str]:
    """``(train_size, train_size, 3)`` uint8 pixels (written into ``out`` when given), or
    ``(reason, detail)``. ``image_size`` is the stored size the manifest promises, checked from the
    header; a smaller ``train_size`` decodes at a reduced DCT scale (then resizes the rest)."""
    train_size = train_size or image_size
    if npy:
        result = _decode_npy(data, image_size, train_size)
    else:
        result = None
        if simplejpeg is not None and bytes(data[:2]) == JPEG_MAGIC:
            result = _decode_turbo(data, image_size, out, train_size)
        if result is None:
            result = _decode_pil(data, image_size, train_size)
    if out is not None and isinstance(result, np.ndarray) and not np.shares_memory(result, out):
        out[...] = result
        return out
    return result


def decode_entry(
    members: dict[str, Any],
    url: str,
    image_size: int,
    *,
    out: np.ndarray | None = None,
    train_size: int | None = None,
) -> LoadedSample | LoadedReject:
    """Image straight to a uint8 (H, W, 3) array (into ``out`` when given); caption and metadata checked."""
    key = members["__key__"]
    unsafe = members.get("__unsafe__", ())

    def reject(reason: str, detail: str) -> LoadedReject:
        return LoadedReject(key, url, reason, detail, unsafe)

    if "__duplicate__" in members:
        return reject("duplicate_member", f"two '.{members['__duplicate__']}' members")
    ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if ext is None:
        return reject("missing_image", "no .jpg member")
    if "txt" not in members:
        return reject("missing_caption", "no .txt member")
    image = decode_image(members[ext], image_size, out=out, train_size=train_size, npy=ext == "npy")
    if isinstance(image, tuple):
        return reject(*image)
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject("bad_caption", f"not UTF-8: {exc}")
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError as exc:
        return reject("bad_metadata", f"not JSON: {exc}")
    return LoadedSample(key, url, image, caption, meta, unsafe)
