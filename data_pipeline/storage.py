"""Object-store access through fsspec: one place that knows how to reach ``s3://``.

The endpoint and credentials come from the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) so the same URL
works against Ceph RGW in tests, MinIO on-prem and AWS S3 in production.

Every call here survives an object-store outage: a transient failure (connection refused or reset,
timeout, HTTP 500/503) is retried with exponential backoff and full jitter until
``TESSERA_STORAGE_RETRY_S`` seconds (default 180) have passed since the call began; then the last
error is raised with a note saying how long it was retried. Streams from :func:`open_resilient`
reopen at their current offset when a read fails, so a long shard read resumes where it broke.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_DEADLINE_ENV = "TESSERA_STORAGE_RETRY_S"
DEFAULT_RETRY_DEADLINE_S = 180.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 20.0
_TRANSIENT_TYPES = (
    ConnectionError,
    TimeoutError,
    FSTimeoutError,
    aiohttp.ClientError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)
# What s3fs turns HTTP 500/503 (InternalError, SlowDown, ServiceUnavailable) and socket trouble into.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT}

# What a worker process (Ray task, DataLoader worker) needs to reach the same object store.
CREDENTIAL_ENV = (
    RETRY_DEADLINE_ENV,
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


def retry_deadline_s() -> float:
    return float(os.environ.get(RETRY_DEADLINE_ENV, DEFAULT_RETRY_DEADLINE_S))


def is_transient(exc: BaseException) -> bool:
    """An error a later attempt may not see: the store (or the network to it) is down or overloaded."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _TRANSIENT_TYPES):
            return True
        if isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(operation: Callable[[], T], what: str) -> T:
    """``operation()``, retried on transient errors with exponential backoff + full jitter to the deadline."""
    deadline = time.monotonic() + retry_deadline_s()
    backoff = FIRST_BACKOFF_S
    attempt = 1
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + backoff > deadline:
                exc.add_note(
                    f"{what}: object store still failing after {attempt} attempts ({RETRY_DEADLINE_ENV})"
                )
                raise
            log.warning("%s: %s: %s; retry %d in <= %.1f s", what, type(exc).__name__, exc, attempt, backoff)
            time.sleep(random.uniform(0, backoff))  # full jitter: many clients do not retry in lockstep
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            attempt += 1


# The secrets among them: forwarded through Ray's runtime_env only on request (Ray writes runtime_env
# env vars in plain text to its runtime_env_agent.log and job table).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FORWARD_SECRETS_ENV = "TESSERA_FORWARD_CREDENTIALS"


def forwards_secrets() -> bool:
    return os.environ.get(FORWARD_SECRETS_ENV, "").lower() in ("1", "true", "yes")


def ray_task_env() -> dict[str, str]:
    """The object-store variables a Ray task gets through ``runtime_env``: the endpoint and retry
    deadline always, the secrets only with ``TESSERA_FORWARD_CREDENTIALS=1``. Without it, workers use
    their own environment: a local Ray inherits the driver's, cluster nodes have theirs (a Kubernetes
    Secret, an instance role)."""
    secrets = forwards_secrets()
    return {name: value for name, value in credential_env().items() if secrets or name not in SECRET_ENV}


def credential_env() -> dict[str, str]:
    """The object-store variables of this process, secrets included (see ``ray_task_env``).

    Ray tasks get them per task (``fn.options(runtime_env={"env_vars": ray_task_env()})``) rather than
    once at ``ray.init``, so a driver that switches stores mid-process still reaches the right one.
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
    # Instances are cached here (``filesystem``), per process; fsspec's own cache is per thread.
    options["skip_instance_cache"] = True
    # No listings cache: another process's writes (a peer rank, a resumed ingest) are seen at once.
    options["use_listings_cache"] = False
    return options


@functools.lru_cache(maxsize=16)
def _remote_filesystem(
    pid: int, protocol: str, options: tuple[tuple[str, Any], ...], credentials: tuple[tuple[str, str], ...]
) -> fsspec.AbstractFileSystem:
    """One instance per (process, store, credentials): a new s3fs costs ~0.3 s of CPU (a botocore
    session and client; 8 index reads per DataLoader worker once spent ~2.5 s creating them), and an
    instance must not cross a fork (its event loop and connections belong to the parent), hence the pid.
    The credentials are in the key because a process may switch stores (tests do)."""
    return fsspec.filesystem(protocol, **dict(options))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for any fsspec URL; plain paths are local files."""
    if is_local(url):
        return url_to_fs(url)
    protocol = url.split("://", 1)[0]
    options = tuple(sorted(storage_options(url).items()))
    fs = _remote_filesystem(os.getpid(), protocol, options, tuple(sorted(credential_env().items())))
    return fs, fs._strip_protocol(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without collapsing ``s3://``."""
    return posixpath.join(url.rstrip("/"), *parts) if parts else url


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    if is_local(url):
        return fs.exists(path)

    def probe() -> bool:  # s3fs.exists answers False when the store is down: ask info() instead
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return retrying(probe, f"exists {url}")


TMP_MARK = ".tmp-"  # ``<name>.tmp-<random>``: a local publish in progress (or crashed mid-way)


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a URL for reading or writing (writes to S3 appear only when closed)."""
    fs, path = filesystem(url)
    if "w" in mode and is_local(url):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    with open_resilient(url) as handle:
        return handle.read()


class _ResumingReader(io.RawIOBase):
    """A read-only stream that reopens at its offset when a read fails transiently (see module doc)."""

    def __init__(self, opener: Callable[[], IO[bytes]], what: str) -> None:
        self._opener, self._what = opener, what
        self._handle: IO[bytes] | None = None
        self._offset = 0

    def readable(self) -> bool:
        return True

    def _attempt(self, size: int) -> bytes:
        try:
            if self._handle is None:
                self._handle = self._opener()
                if self._offset:
                    self._handle.seek(self._offset)
            return self._handle.read(size)
        except Exception:
            self._drop()
            raise

    def read(self, size: int = -1) -> bytes:
        data = retrying(lambda: self._attempt(size), f"read {self._what} at byte {self._offset}")
        self._offset += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def _drop(self) -> None:
        if self._handle is not None:
            with suppress(Exception):  # closing a broken connection may fail too; the next attempt reopens
                self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_resilient(url: str, **open_options: Any) -> IO[bytes]:
    """A sequential reader of ``url`` that rides out an outage (local files: a plain file)."""
    if is_local(url):
        return open(url.removeprefix("file://"), "rb")
    fs, path = filesystem(url)
    return _ResumingReader(lambda: fs.open(path, "rb", **open_options), url)


def publish_file(local_path: str, url: str) -> None:
    """Copy a finished local file to ``url`` so readers only ever see it whole.

    Local targets get a same-directory temporary name and an atomic ``os.replace``;
    S3 objects become visible only when the upload completes.
    """
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)
    else:
        retrying(lambda: fs.put_file(local_path, path), f"upload {url}")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` in one step (manifests, markers, small JSON)."""
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        retrying(lambda: fs.pipe_file(path, data), f"write {url}")


def download_tree(url: str, local_dir: str) -> None:
    """Copy every object under ``url`` into ``local_dir`` (checkpoint downloads)."""
    fs, path = filesystem(url)
    retrying(lambda: fs.get(path.rstrip("/") + "/", local_dir, recursive=True), f"download {url}")


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


def _ls(url: str) -> list[dict[str, Any]]:
    """What is directly under ``url``, with details, in one listing (an absent folder is empty)."""
    fs, path = filesystem(url)

    def attempt() -> list[dict[str, Any]]:
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    return sorted(retrying(attempt, f"list {url}"), key=lambda info: info["name"])


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files (and folders) directly under ``url`` ending with ``suffix`` (sorted)."""
    protocol = url.split("://", 1)[0] + "://" if "://" in url and not is_local(url) else ""
    return [protocol + info["name"] for info in _ls(url) if info["name"].endswith(suffix)]


def file_sizes(url: str) -> dict[str, int]:
    """``{file name: size}`` of the files directly under ``url``, from one listing."""
    return {
        posixpath.basename(info["name"].rstrip("/")): int(info.get("size") or 0)
        for info in _ls(url)
        if info["type"] == "file"
    }


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)

    def attempt() -> None:
        with suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    retrying(attempt, f"remove {url}")


def register_webdataset_s3() -> None:
    """Teach ``webdataset.gopen`` to open ``s3://`` URLs through s3fs.

    webdataset has no s3 handler of its own; call again in each DataLoader worker.
    """
    import webdataset

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO:
        return open_url(url, mode)

    webdataset.gopen_schemes["s3"] = open_s3
