"""Shard member indexes: offsets match Python ``tarfile``'s for every member, and the entries sliced out
by offset are byte for byte what webdataset's own streaming tar reader groups into samples.

Covered: ingest's ``ShardWriter`` shards (with their sidecar), tars in GNU, pax and ustar formats with
long (>100 character) names, pax headers and non-ASCII names, a tar made by the GNU ``tar`` program,
img2dataset's webdataset layout, and truncated or damaged tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.shard_reader import ShardWindow
from data_pipeline.tar_index import TarIndexError, build_index, index_name, parse_index
from tests.test_loader import jpeg, sample_members, write_dataset

LONG = "a-rather-long-directory-name/" * 4 + "k" * 40  # 156 characters before the extension


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tarfile_members(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """The reference: ``tarfile``'s own view of every regular member, with its payload."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset_data, m.size, tar.extractfile(m).read()) for m in tar if m.isreg()]


def webdataset_samples(data: bytes) -> list[dict]:
    """The second reference: what webdataset's streaming reader groups into samples."""
    stream = tar_file_expander([{"stream": io.BytesIO(data), "url": "mem"}])
    return [
        {k: v for k, v in sample.items() if not k.startswith("__")} | {"__key__": sample["__key__"]}
        for sample in group_by_keys(stream)
    ]


def check_index(data: bytes) -> None:
    index = build_index(data, digest(data))
    reference = tarfile_members(data)
    assert [(n, o, s) for n, o, s, _ in reference] == list(index.members)
    assert all(data[o : o + s] == payload for _, o, s, payload in reference)
    window = ShardWindow("mem", index, data, 0)
    sliced = [window.members(i) for i in range(len(index.entries))]
    assert sliced == webdataset_samples(data)
    assert index.truncated is None


def make_tar(members: list[tuple[str, bytes]], fmt: int, **pax) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            if pax:
                info.pax_headers = dict(pax)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def samples(keys: list[str]) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{ext}", data) for i, key in enumerate(keys) for ext, data in sample_members(key, i).items()
    ]


def test_shard_writer_shards_carry_a_sidecar_index_matching_tarfile(tmp_path):
    manifest = write_dataset(str(tmp_path), (5, 3))
    for entry in manifest.shards:
        data = Path(manifest.shard_url(entry)).read_bytes()
        assert entry.index == index_name(entry.name)
        sidecar = Path(manifest.index_url(entry)).read_bytes()
        index = parse_index(sidecar, sha256=entry.sha256, size=entry.bytes, where="sidecar")
        assert index == build_index(data, entry.sha256)
        check_index(data)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_and_formats(fmt):
    keys = (
        [f"{LONG}-{i}" for i in range(3)]
        if fmt != tarfile.USTAR_FORMAT
        else ["d/" * 40 + f"k{i}" for i in range(3)]
    )
    check_index(make_tar(samples(keys), fmt))


def test_pax_headers_and_non_ascii_names():
    keys = ["caf\u00e9-\u00fcber-\u65e5\u672c", f"{LONG}-pax"]
    check_index(make_tar(samples(keys), tarfile.PAX_FORMAT, comment="x" * 300, path_note="y"))


def test_webdataset_writer_with_long_keys_and_meta_members(tmp_path):
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        for i, key in enumerate([f"{LONG}-{i}" for i in range(3)]):
            writer.write({"__key__": key, **sample_members(key, i)})
    data = buffer.getvalue()
    check_index(data)


def test_img2dataset_webdataset_tar():
    """img2dataset's ``output_format="webdataset"``: ``00000.tar`` holding ``000000000.jpg/.txt/.json``
    per sample (written with webdataset's TarWriter), keys numbered across the shard."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        for i in range(4):
            key = f"{i:09d}"
            meta = {"url": f"http://127.0.0.1/{key}.jpg", "key": key, "status": "success", "width": 8}
            writer.write(
                {"__key__": key, "jpg": jpeg(i, 8), "txt": b"a caption", "json": json.dumps(meta).encode()}
            )
    check_index(buffer.getvalue())


@pytest.mark.skipif(shutil.which("tar") is None, reason="no GNU tar program")
def test_a_tar_made_by_the_tar_program(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name, payload in samples(["000000000", "000000001", LONG.replace("/", "_")]):
        (folder / name).write_bytes(payload)
    out = tmp_path / "out.tar"
    subprocess.run(["tar", "-C", str(folder), "--sort=name", "-cf", str(out), "."], check=True)
    check_index(out.read_bytes())


def test_truncated_and_damaged_tars_are_flagged(tmp_path):
    manifest = write_dataset(str(tmp_path), (4,))
    data = Path(manifest.shard_url(manifest.shards[0])).read_bytes()
    whole = build_index(data, digest(data))
    cut_in_member = data[: whole.members[-2][1] + 3]  # inside the last sample's txt payload
    index = build_index(cut_in_member, digest(cut_in_member))
    assert index.truncated == "unexpected end of data"
    assert [e.whole for e in index.entries] == [True, True, True, False]
    cut_in_header = data[: whole.members[3][1] - 512 + 100]  # inside the 2nd sample's first header
    index = build_index(cut_in_header, digest(cut_in_header))
    assert index.truncated and "end-of-archive" in index.truncated
    assert [e.whole for e in index.entries] == [False]


def test_an_index_of_other_bytes_is_refused(tmp_path):
    manifest = write_dataset(str(tmp_path), (2,))
    entry = manifest.shards[0]
    sidecar = Path(manifest.index_url(entry)).read_bytes()
    with pytest.raises(TarIndexError, match="describes a shard of sha256"):
        parse_index(sidecar, sha256="0" * 64, size=entry.bytes, where="x")
    raw = json.loads(sidecar)
    raw["members"][0][1] = entry.bytes  # an offset past the shard's end
    with pytest.raises(TarIndexError, match="outside the shard"):
        parse_index(json.dumps(raw).encode(), sha256=entry.sha256, size=entry.bytes, where="x")
