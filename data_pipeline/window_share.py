"""A rank's window bytes fetched once and shared by its DataLoader workers through local files.

Every worker of a rank draws its batches from every shard of the current window (the order must not
depend on the worker count), so without sharing a rank with ``n`` workers fetches each window's bytes
``n`` times: ``n`` times the store traffic and the CPU to receive it. Instead, the first worker to need
a (window, shard) fetches it and publishes the bytes as a file in a directory the rank's main process
owns (the page cache, not the store, serves the others); the rest block on the fetcher's lock. A
file is deleted once every worker that uses it has said it is done, and the main process removes the
directory when the epoch's iteration ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Hashable, Iterable


class WindowShare:
    """Worker ``worker``'s view of the shared files in ``directory``; ``users`` says, for every key,
    which workers read it (so the last one to finish deletes it)."""

    def __init__(self, directory: str, users: dict[Hashable, Iterable[int]], worker: int) -> None:
        self.directory = directory
        self.users = {key: sorted(set(ids)) for key, ids in users.items()}
        self.worker = worker

    def _path(self, key: Hashable) -> str:
        return os.path.join(self.directory, "-".join(str(part) for part in key))  # keys are int tuples

    def get(self, key: Hashable, produce: Callable[[], bytes]) -> bytes:
        """The bytes for ``key``: produced here if no other worker has published them, else theirs.

        The check-and-fetch runs under an exclusive ``flock`` on the key's lock file, so the others
        block (an event, not a poll) until the first fetcher has published, then read its file."""
        path = self._path(key)
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.path.exists(path):
                data = produce()
                with open(f"{path}.part", "wb") as handle:
                    handle.write(data)
                os.replace(f"{path}.part", path)
                return data
        finally:
            os.close(fd)  # releases the lock
        with open(path, "rb") as handle:  # not deleted before this worker's own release()
            return handle.read()

    def release(self, key: Hashable) -> None:
        """This worker is done with ``key``; the last of its users deletes the file."""
        path = self._path(key)
        open(f"{path}.done-{self.worker}", "wb").close()
        if all(os.path.exists(f"{path}.done-{worker}") for worker in self.users[key]):
            for name in (path, f"{path}.lock", *(f"{path}.done-{w}" for w in self.users[key])):
                with contextlib.suppress(FileNotFoundError):  # another user got there first
                    os.unlink(name)
