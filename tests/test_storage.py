"""One object-store filesystem per (process, store, credentials), never shared across a fork, and no
listings cache: another client's writes are seen at once."""

from __future__ import annotations

import multiprocessing

import s3fs

from data_pipeline import storage


def _child_reads(url: str, parent_fs, results) -> None:
    fs, _ = storage.filesystem(url)
    results.put((fs is parent_fs, storage.read_bytes(url)))


def test_one_instance_per_process_and_store(s3_moto, monkeypatch):
    url = s3_moto.url("fs-cache")
    storage.write_bytes_atomic(f"{url}/a.txt", b"a")
    first, path = storage.filesystem(f"{url}/a.txt")
    assert path == f"{url}/a.txt".removeprefix("s3://")
    assert storage.filesystem(f"{url}/b.txt")[0] is first  # creating a client costs ~0.3 s of CPU
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert storage.filesystem(url)[0] is not first  # switched credentials: a client of their own
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_moto.secret_key)
    assert storage.filesystem(url)[0] is first

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child_reads, args=(f"{url}/a.txt", first, results))
    child.start()
    shared, data = results.get(timeout=60)
    child.join(timeout=60)
    assert not shared and data == b"a"  # the child built its own (the parent's loop is not its own)


def test_listings_see_another_clients_writes_at_once(s3_moto):
    url = s3_moto.url("listing")
    storage.write_bytes_atomic(f"{url}/one", b"1")
    assert [name.rsplit("/", 1)[-1] for name in storage.list_files(url)] == ["one"]
    other = s3fs.S3FileSystem(
        key=s3_moto.access_key,
        secret=s3_moto.secret_key,
        endpoint_url=s3_moto.endpoint,
        skip_instance_cache=True,
    )
    other.pipe_file(f"{url}/two".removeprefix("s3://"), b"2")  # as a peer process would
    assert sorted(name.rsplit("/", 1)[-1] for name in storage.list_files(url)) == ["one", "two"]
    assert storage.exists(f"{url}/two")
