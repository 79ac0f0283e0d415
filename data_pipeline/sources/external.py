"""Existing image+caption data: a folder of ``x.jpg`` + ``x.txt``, img2dataset WebDataset shards, parquet.

img2dataset's three output formats all ingest: ``webdataset`` (tars), ``parquet`` (image bytes in the
rows) and the default ``files`` (numbered folders of jpg/txt/json with a metadata parquet beside each).

Images are handed to ingestion still encoded, so a file that does not decode is a counted reject.
Anything a hostile or damaged file can do (names escaping the directory, links, a shard cut short)
becomes a :class:`Rejected` record rather than an exception, so one bad file loses only itself.
Local folders are walked without following directory links, and a file is read only if it is a
regular file whose real path lies inside the source folder and whose size is under the cap: a named
pipe cannot hang the ingest, a link to ``/dev/zero`` or ``/etc`` is never read.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from data_pipeline import storage
from data_pipeline.sources.base import Partition, Rejected, Sample, split_evenly

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "image_bytes")
CAPTION_COLUMNS = ("caption", "txt", "text", "prompt")
# webdataset's key rule: the key is the path up to the first dot of the file's base name.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _url(spec: str, path: str) -> str:
    """Re-attach the protocol fsspec strips from listed paths (local paths stay plain)."""
    return path if storage.is_local(spec) else f"{spec.split('://', 1)[0]}://{path}"


def _list(spec: str) -> list[str]:
    fs, path = storage.filesystem(spec)
    if any(char in spec for char in "*?["):
        return sorted(_url(spec, p) for p in fs.glob(path))
    if storage.is_local(spec) and os.path.isdir(path):  # os.walk never descends into a linked folder
        return sorted(os.path.join(top, name) for top, _, names in os.walk(path) for name in names)
    if fs.isdir(path):
        return sorted(_url(spec, p) for p in fs.find(path))
    if fs.exists(path):
        return [spec]
    raise FileNotFoundError(f"source {spec!r}: no such file, folder or pattern")


def source_root(spec: str) -> str:
    """The folder a local source's files must really live in (links resolved)."""
    path = spec.removeprefix("file://")
    glob_at = min((path.index(c) for c in "*?[" if c in path), default=None)
    if glob_at is not None:
        path = path[:glob_at].rsplit("/", 1)[0] or "/"
    elif not os.path.isdir(path):
        path = os.path.dirname(path) or "."
    return os.path.realpath(path)


def _open_checked(url: str, root: str) -> IO[bytes] | Rejected:
    """A read handle on a regular file inside ``root`` (object storage: just the stream), or why not."""
    if not storage.is_local(url):
        return storage.open_resilient(url)
    real = os.path.realpath(url.removeprefix("file://"))
    if os.path.commonpath([real, root]) != root:
        return Rejected("outside_source", f"{url}: resolves to {real}, outside the source folder {root}")
    try:  # non-blocking: opening a named pipe must not wait for a writer; no link swapped in since
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        return Rejected("unreadable_file", f"{url}: {exc.strerror}")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return Rejected("not_a_regular_file", f"{url}: a pipe, device or socket")
    return os.fdopen(fd, "rb")


def _read_capped(url: str, root: str, max_bytes: int) -> bytes | Rejected:
    """The file's bytes, never more than ``max_bytes`` read (a bigger file is rejected)."""
    handle = _open_checked(url, root)
    if isinstance(handle, Rejected):
        return handle
    with handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        return Rejected("file_too_large", f"{url}: more than the {max_bytes}-byte cap (max_file_bytes)")
    return data


def _extension(url: str) -> str:
    return posixpath.splitext(url)[1].lower().lstrip(".")


def detect_kind(files: list[str], spec: str) -> str:
    extensions = {_extension(f) for f in files}
    if "tar" in extensions:
        return "wds"
    # Loose images win over parquet: img2dataset's default `files` output puts a metadata .parquet
    # (urls, captions, status; no image bytes) beside each folder of images.
    if extensions & set(IMAGE_EXTENSIONS):
        return "folder"
    if "parquet" in extensions:
        return "parquet"
    raise ValueError(
        f"source {spec!r}: found no *.tar shards, *.parquet files or images "
        f"({', '.join(IMAGE_EXTENSIONS)}); extensions seen: {sorted(extensions) or 'none'}"
    )


@dataclass(frozen=True)
class ExternalSource:
    """Files resolved once on the driver; partitions are file lists (or parquet row groups)."""

    spec: str
    kind: str
    files: tuple[str, ...]
    # Folder sources: the .txt/.json files listed beside the images, so no task has to ask the
    # store whether a caption exists (one request per sample on S3).
    sidecars: frozenset[str] = frozenset()
    root: str = ""  # local sources: the real folder every file read must lie in
    max_file_bytes: int = 64 * 2**20

    @classmethod
    def open(cls, spec: str, max_file_bytes: int = 64 * 2**20) -> ExternalSource:
        listing = _list(spec)
        kind = detect_kind(listing, spec)
        wanted = {"wds": ("tar",), "parquet": ("parquet",), "folder": IMAGE_EXTENSIONS}[kind]
        chosen = tuple(f for f in listing if _extension(f) in wanted)
        sidecars = (
            frozenset(f for f in listing if _extension(f) in ("txt", "json"))
            if kind == "folder"
            else frozenset()
        )
        root = source_root(spec) if storage.is_local(spec) else ""
        return cls(spec, kind, chosen, sidecars, root, max_file_bytes)

    def partitions(self, num_partitions: int, num_samples: int | None) -> list[Partition]:
        if self.kind == "folder":
            units = [self._folder_unit(i, f) for i, f in enumerate(self.files[:num_samples])]
        elif self.kind == "parquet":
            units = _row_group_units(self.files, num_samples)
        else:
            if num_samples is not None:
                raise ValueError(
                    f"source {self.spec!r}: tar shards do not say how many samples they hold, so "
                    "num_samples cannot be applied; leave it unset to ingest every shard"
                )
            units = list(self.files)
        return [Partition(p, items) for p, items in enumerate(split_evenly(units, num_partitions))]

    def read(self, partition: Partition) -> Iterator[tuple[int, Sample | Rejected]]:
        if self.kind == "folder":
            for index, *urls in partition.items:
                yield index, self._read_folder_item(*urls)
        elif self.kind == "parquet":
            for unit in partition.items:
                yield from _read_row_group(*unit)
        else:
            ordinal = 0
            for url in partition.items:
                for record in self._read_tar(url):
                    yield ordinal, record
                    ordinal += 1

    def info(self) -> dict[str, Any]:
        return {}

    def lineage(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "split": "train", "num_files": len(self.files)}

    def _read_folder_item(
        self, image_url: str, caption_url: str | None, metadata_url: str | None
    ) -> Sample | Rejected:
        if caption_url is None:
            return Rejected("missing_caption", f"{image_url}: no caption .txt beside it")
        image, caption, extra = (
            _read_capped(url, self.root, self.max_file_bytes) if url else b"{}"
            for url in (image_url, caption_url, metadata_url)
        )
        problem = next((part for part in (image, caption, extra) if isinstance(part, Rejected)), None)
        if problem is not None:
            return problem
        metadata: dict[str, Any] = {"source_file": image_url}
        try:
            metadata.update(json.loads(extra))
        except (ValueError, TypeError) as exc:
            return Rejected("bad_metadata", f"{metadata_url}: {exc}")
        try:
            text = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected("bad_caption", f"{caption_url}: not UTF-8 ({exc})")
        return Sample(image=image, caption=text, metadata=metadata)

    def _read_tar(self, url: str) -> Iterator[Sample | Rejected]:
        """Samples of one shard, grouping consecutive members by key as webdataset does."""
        handle = _open_checked(url, self.root)
        if isinstance(handle, Rejected):
            yield handle
            return
        yield from _read_tar(url, handle, self.max_file_bytes)

    def _folder_unit(self, index: int, image_url: str) -> tuple[int, str, str | None, str | None]:
        stem = posixpath.splitext(image_url)[0]
        caption, metadata = stem + ".txt", stem + ".json"
        return (
            index,
            image_url,
            caption if caption in self.sidecars else None,
            metadata if metadata in self.sidecars else None,
        )


def _unsafe_reason(member: tarfile.TarInfo, max_bytes: int) -> str | None:
    if not (member.isfile() or member.isdir()):
        return "is a link or device, not a regular file"
    parts = member.name.split("/")
    if member.name.startswith("/") or ".." in parts:
        return "escapes the shard's directory"
    if member.size > max_bytes:
        return f"holds {member.size} bytes, over the max_file_bytes cap"
    return None


def _group_to_record(url: str, key: str, members: dict[str, bytes]) -> Sample | Rejected:
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return Rejected("missing_image", f"{url}: sample {key!r} has no image member")
    if "txt" not in members:
        return Rejected("missing_caption", f"{url}: sample {key!r} has no .txt member")
    metadata: dict[str, Any] = {"source_file": url, "source_key": key}
    if "json" in members:
        try:
            metadata.update(json.loads(members["json"]))
        except (ValueError, TypeError) as exc:
            return Rejected("bad_metadata", f"{url}: {key}.json: {exc}")
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("bad_caption", f"{url}: {key}.txt is not UTF-8 ({exc})")
    return Sample(image=image, caption=caption, metadata=metadata)


class _TailReader:
    """Passes reads through, remembering the last bytes: a whole tar ends in two zero blocks.

    Python's tarfile stops quietly when a stream ends exactly on a header boundary, so a shard cut
    there would look complete; the missing end-of-archive marker is how we notice.
    """

    END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)

    def __init__(self, handle) -> None:
        self.handle = handle
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.tail = (self.tail + data)[-len(self.END_OF_ARCHIVE) :]
        return data

    def ended_properly(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.tail == self.END_OF_ARCHIVE


def _read_tar(url: str, handle: IO[bytes], max_bytes: int) -> Iterator[Sample | Rejected]:
    key, members = None, {}
    try:
        with handle:
            reader = _TailReader(handle)
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
                for member in archive:
                    reason = _unsafe_reason(member, max_bytes)
                    if reason is not None:
                        yield Rejected("unsafe_member", f"{url}: member {member.name!r} {reason}")
                        continue
                    match = MEMBER_NAME.match(member.name)
                    if member.isdir() or match is None:
                        continue
                    member_key, extension = match.group(1), match.group(2).lower()
                    if member_key != key:
                        if key is not None:
                            yield _group_to_record(url, key, members)
                        key, members = member_key, {}
                    members[extension] = archive.extractfile(member).read()
            if not reader.ended_properly():
                raise tarfile.ReadError("no end-of-archive marker: the shard was cut short")
    except (tarfile.TarError, EOFError, OSError) as exc:
        # The sample being read when the shard broke is lost with it; earlier ones are already out.
        yield Rejected("corrupt_shard", f"{url}: {type(exc).__name__}: {exc}")
        return
    if key is not None:
        yield _group_to_record(url, key, members)


def _columns(url: str, names: list[str]) -> tuple[str, str]:
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    if image is None or caption is None:
        raise ValueError(
            f"{url}: needs an image column (one of {IMAGE_COLUMNS}) and a caption column "
            f"(one of {CAPTION_COLUMNS}); it has {names}"
        )
    return image, caption


def _row_group_units(files: tuple[str, ...], num_samples: int | None) -> list[tuple[str, int, int, int]]:
    """``(file, row_group, first_index, rows_to_take)`` for each row group, cut at ``num_samples``."""
    import pyarrow.parquet as pq

    units, taken = [], 0
    for url in files:
        with storage.open_url(url) as handle:
            parquet = pq.ParquetFile(handle)
            _columns(url, parquet.schema_arrow.names)
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if num_samples is not None:
                    rows = min(rows, num_samples - taken)
                if rows <= 0:
                    return units
                units.append((url, group, taken, rows))
                taken += rows
    return units


def _read_row_group(
    url: str, group: int, first_index: int, rows: int
) -> Iterator[tuple[int, Sample | Rejected]]:
    import pyarrow.parquet as pq

    with storage.open_url(url) as handle:
        parquet = pq.ParquetFile(handle)
        image_column, caption_column = _columns(url, parquet.schema_arrow.names)
        records = parquet.read_row_group(group).slice(0, rows).to_pylist()
    for offset, row in enumerate(records):
        image, caption = row.pop(image_column), row.pop(caption_column)
        if isinstance(image, dict):  # Hugging Face image struct {"bytes": ..., "path": ...}
            image = image.get("bytes")
        if image is None:
            record: Sample | Rejected = Rejected("missing_image", f"{url}: row group {group} row {offset}")
        elif caption is None:
            record = Rejected("missing_caption", f"{url}: row group {group} row {offset}")
        else:
            record = Sample(image=bytes(image), caption=str(caption), metadata={"source_file": url, **row})
        yield first_index + offset, record
