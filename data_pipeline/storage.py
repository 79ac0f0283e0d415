"""Object-store access through fsspec: one place that knows how to reach ``s3://``.

The endpoint and credentials come from the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) so the same URL
works against Ceph RGW in tests, MinIO on-prem and AWS S3 in production.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

# What a worker process (Ray task, DataLoader worker) needs to reach the same object store.
CREDENTIAL_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


def credential_env() -> dict[str, str]:
    """The object-store variables of this process, for a Ray task's ``runtime_env``.

    Passing them per task (``fn.options(runtime_env={"env_vars": credential_env()})``) rather than
    once at ``ray.init`` means a driver that switches stores mid-process still reaches the right one.
    """
    return {name: os.environ[name] for name in CREDENTIAL_ENV if name in os.environ}


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint from the environment for ``s3://``."""
    if not url.startswith("s3://"):
        return {}
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    # A fresh instance per process: s3fs caches instances across fork, which breaks workers.
    options["skip_instance_cache"] = True
    return options


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for any fsspec URL; plain paths are local files."""
    return url_to_fs(url, **storage_options(url))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without collapsing ``s3://``."""
    return posixpath.join(url.rstrip("/"), *parts) if parts else url


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a URL for reading or writing (writes to S3 appear only when closed)."""
    fs, path = filesystem(url)
    if "w" in mode and is_local(url):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as handle:
        return handle.read()


def publish_file(local_path: str, url: str) -> None:
    """Copy a finished local file to ``url`` so readers only ever see it whole.

    Local targets get a same-directory temporary name and an atomic ``os.replace``;
    S3 objects become visible only when the upload completes.
    """
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)
    else:
        fs.put_file(local_path, path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` in one step (manifests, markers, small JSON)."""
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


@contextmanager
def staged_local_file(suffix: str = "") -> Iterator[str]:
    """A temporary local file path, removed afterwards; build here, then ``publish_file``."""
    handle, path = tempfile.mkstemp(suffix=suffix)
    os.close(handle)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under ``url`` ending with ``suffix`` (sorted)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    protocol = url.split("://", 1)[0] + "://" if "://" in url and not is_local(url) else ""
    names = sorted(fs.ls(path, detail=False))
    return [protocol + name if protocol else name for name in names if name.endswith(suffix)]


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def register_webdataset_s3() -> None:
    """Teach ``webdataset.gopen`` to open ``s3://`` URLs through s3fs.

    webdataset has no s3 handler of its own; call again in each DataLoader worker.
    """
    import webdataset

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO:
        return open_url(url, mode)

    webdataset.gopen_schemes["s3"] = open_s3
