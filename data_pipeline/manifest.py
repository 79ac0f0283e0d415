"""The dataset manifest: the one file a loader, a tokenizer and a training run need to find a dataset.

It lists every shard with its sample count, size and sha256, so readers can verify what they got,
and records the source's lineage and the ingest config; training logs ``manifest.content_id()`` (a
hash of the shards' names, hashes and counts only) so a model can be traced back to the exact data it
saw, whenever and wherever that data was built. Shard names resolve relative to the manifest's own
location, so a dataset folder can be copied or moved as a whole; a name that would resolve anywhere
else (``..``, an absolute path, another URL) is refused when the manifest is read.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from data_pipeline import storage

FORMAT = "tessera-wds/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, not JSON, or inconsistent with itself."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    partition: int = Field(ge=0)
    # The shard's member index beside it (``tar_index``: every member's byte offset and size), so a
    # reader slices samples out of byte ranges; None: built from the shard on first read and cached.
    index: str | None = None

    @field_validator("name", "index")
    @classmethod
    def _inside_the_dataset(cls, name: str | None) -> str | None:
        problem = None if name is None else name_problem(name)
        if problem:
            raise ValueError(f"shard name {name!r} {problem}; names must stay inside the dataset folder")
        return name


def name_problem(name: str) -> str | None:
    """Why ``name`` would not resolve inside the dataset folder (None: a plain relative path)."""
    if not name or "\0" in name or "\\" in name:
        return "is empty or holds a NUL or backslash"
    if "://" in name or name.split("/", 1)[0].endswith(":"):
        return "names a URL or drive of its own"
    if name.startswith("/"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' path component"
    return None


def listing_problems(entries: list[ShardEntry], urls: list[str]) -> dict[str, str]:
    """``{shard name: problem}`` for shards absent from the store or of another size than recorded,
    from one listing per folder (one for a normal dataset): cheap enough to run before every epoch 0."""
    listings: dict[str, dict[str, int]] = {}
    problems: dict[str, str] = {}
    for entry, url in zip(entries, urls, strict=True):
        folder, name = storage.parent(url), url.rstrip("/").rsplit("/", 1)[-1]
        if folder not in listings:
            listings[folder] = storage.file_sizes(folder)
        size = listings[folder].get(name)
        if size is None:
            problems[entry.name] = "missing"
        elif size != entry.bytes:
            problems[entry.name] = f"{size} bytes, the manifest says {entry.bytes}"
    return problems


class SourceLineage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: str
    kind: str
    seed: int | None = None
    split: str = "train"
    num_requested: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["tessera-wds/1"] = FORMAT
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    source: SourceLineage
    image_size: int = Field(gt=0)
    image_format: Literal["jpg", "npy"] = "jpg"  # npy: raw uint8 pixels (ingest's image_format)
    num_samples: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    shards: list[ShardEntry]
    rejects: dict[str, int] = Field(default_factory=dict)
    duplicates_dropped: int = Field(default=0, ge=0)
    config: dict[str, Any] = Field(default_factory=dict)
    # What the source says about itself beyond lineage, for the stages that use the data (the synthetic
    # source: its held-out (colour, shape) pairs and prompts naming them), so none imports the source.
    source_info: dict[str, Any] = Field(default_factory=dict)
    # How the ingest went (seconds, samples/s, partitions resumed): reporting, not data.
    stats: dict[str, Any] = Field(default_factory=dict)

    _location: str | None = PrivateAttr(default=None)
    _raw: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _totals_add_up(self) -> Manifest:
        samples = sum(shard.num_samples for shard in self.shards)
        size = sum(shard.bytes for shard in self.shards)
        if samples != self.num_samples or size != self.total_bytes:
            raise ValueError(
                f"shards hold {samples} samples / {size} bytes but the manifest says "
                f"{self.num_samples} samples / {self.total_bytes} bytes"
            )
        return self

    @property
    def location(self) -> str | None:
        """The URL this manifest was loaded from or saved to."""
        return self._location

    def shard_url(self, entry: ShardEntry) -> str:
        """Where the shard is now: beside the manifest if it has a location, else its recorded URL."""
        if self._location is None:
            return entry.url
        return storage.join(storage.parent(self._location), entry.name)

    def shard_urls(self) -> list[str]:
        return [self.shard_url(entry) for entry in self.shards]

    def index_url(self, entry: ShardEntry) -> str | None:
        """Where the shard's member index is (named like shards, relative to the dataset), or None."""
        if entry.index is None:
            return None
        if self._location is None:
            return storage.join(storage.parent(entry.url), entry.index.rsplit("/", 1)[-1])
        return storage.join(storage.parent(self._location), entry.index)

    def listing_problems(self) -> dict[str, str]:
        """Shards missing or of the wrong size, from one listing of the dataset folder."""
        return listing_problems(self.shards, self.shard_urls())

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    def sha256(self) -> str:
        """sha256 of the manifest's bytes as stored (as they would be stored, if never saved)."""
        return hashlib.sha256(self._raw if self._raw is not None else self.to_bytes()).hexdigest()

    def content_id(self) -> str:
        """sha256 over the shards' (name, sha256, num_samples) only: the identity of the data itself,
        unchanged by where it is stored, when it was built, or how the ingest went (lineage tags)."""
        rows = [[shard.name, shard.sha256, shard.num_samples] for shard in self.shards]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The numbers a person (or an MLflow run) wants after an ingest."""
        return {
            "location": self._location,
            "samples": self.num_samples,
            "shards": len(self.shards),
            "bytes": self.total_bytes,
            "rejects": dict(self.rejects),
            "duplicates_dropped": self.duplicates_dropped,
            "manifest_sha256": self.sha256(),
            "content_id": self.content_id(),
            **self.stats,
        }


def manifest_location(url: str) -> str:
    """Accept the dataset folder or the manifest file itself."""
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def parse_manifest(data: bytes, location: str | None = None) -> Manifest:
    where = location or "<manifest>"
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in item['loc']) or '<root>'}': {item['msg']}"
            for item in exc.errors()
        )
        raise ManifestError(f"{where}: not a valid {FORMAT} manifest: {problems}") from None
    manifest._location = location
    manifest._raw = bytes(data)
    return manifest


def load_manifest(url: str) -> Manifest:
    location = manifest_location(url)
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise ManifestError(f"{location}: no manifest there (was the ingest finished?)") from None
    return parse_manifest(data, location)


def save_manifest(manifest: Manifest, url: str) -> str:
    """Publish atomically (readers see the old manifest or the new one, never half of one)."""
    location = manifest_location(url)
    data = manifest.to_bytes()
    storage.write_bytes_atomic(location, data)
    manifest._location = location
    manifest._raw = data
    return location
