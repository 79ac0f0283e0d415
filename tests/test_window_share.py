"""Window bytes shared by a rank's DataLoader workers: each key fetched once, the others block until
it is published, and the file goes once its last user is done (the loader-level check, two workers
reading each window's shards once, is in test_loader_shuffle.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from data_pipeline.window_share import WindowShare

PROCESSES = 4


def _fetch_once(directory: str, log: str, barrier, results) -> None:
    share = WindowShare(directory, {(0, 1): range(PROCESSES)}, 0)
    barrier.wait()  # every process asks at the same moment: without the lock each would fetch

    def produce() -> bytes:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return os.urandom(1 << 20)  # ~1 ms to write: others arrive while it is unpublished

    results.put(share.get((0, 1), produce))


def test_concurrent_workers_fetch_a_key_once_and_all_see_its_bytes(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    log = tmp_path / "fetches.log"
    procs = [
        context.Process(target=_fetch_once, args=(str(tmp_path), str(log), barrier, results))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    seen = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert len(log.read_text().split()) == 1
    assert all(data == seen[0] for data in seen) and len(seen[0]) == 1 << 20


def test_the_file_is_deleted_only_after_its_last_user_is_done(tmp_path):
    users = {(3, 7): [0, 2]}
    first, second = WindowShare(str(tmp_path), users, 0), WindowShare(str(tmp_path), users, 2)
    assert first.get((3, 7), lambda: b"window") == b"window"
    first.release((3, 7))
    assert second.get((3, 7), lambda: pytest.fail("fetched again although published")) == b"window"
    assert (tmp_path / "3-7").exists()
    second.release((3, 7))
    assert list(tmp_path.iterdir()) == []
