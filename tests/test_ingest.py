"""Ingestion on a real local Ray cluster: shards + manifest on disk and S3, dedup, rejects, resume."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import storage
from data_pipeline.ingest import IngestError, ingest, marker_url
from data_pipeline.ledger import SampleLedger, manifest_keys
from data_pipeline.loader import open_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.sources.synthetic import HELDOUT_COMBINATIONS, contains_heldout, generate_scene
from tests.services import start_gateway, stop_gateway
from tests.test_loader import UNEVEN, upload, write_dataset
from tests.test_sources import add_member, jpeg_bytes, make_folder, write_wds

REPO = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^[a-z]+-(\d{5})-(\d{7})$")
# tarfile closes an archive with two zero blocks and pads it to a whole record (20 blocks).
TAR_CLOSING = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE


def read_shard(data: bytes) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def check_manifest_against_shards(dest: str, image_size: int) -> tuple[object, dict[str, dict[str, bytes]]]:
    """Every number in the manifest must be what the shards really hold; returns all samples."""
    manifest = load_manifest(dest)
    assert (
        manifest.sha256()
        == hashlib.sha256(storage.read_bytes(storage.join(dest, "manifest.json"))).hexdigest()
    )
    listed = sorted(url.rsplit("/", 1)[-1] for url in storage.list_files(dest, suffix=".tar"))
    assert listed == sorted(entry.name for entry in manifest.shards)  # no stray or missing shards
    everything: dict[str, dict[str, bytes]] = {}
    for entry in manifest.shards:
        data = storage.read_bytes(manifest.shard_url(entry))
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256
        samples = read_shard(data)
        assert len(samples) == entry.num_samples
        for key, members in samples.items():
            match = KEY.match(key)
            assert match and int(match.group(1)) == entry.partition, key
            assert set(members) == {"jpg", "txt", "json"}
            image = Image.open(io.BytesIO(members["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (image_size, image_size)
            assert members["txt"].decode("utf-8").strip()
            assert json.loads(members["json"])["key"] == key
        assert not set(samples) & set(everything)
        everything.update(samples)
    assert manifest.num_samples == len(everything)
    assert manifest.total_bytes == sum(entry.bytes for entry in manifest.shards)
    return manifest, everything


def test_synthetic_ingest_to_a_local_folder(ray_local, tmp_path):
    dest = str(tmp_path / "ds")
    options = dict(num_samples=240, image_size=32, partitions=3, shard_max_bytes=32 * 1024, progress=False)
    manifest = ingest("synthetic", dest, **options)
    manifest, samples = check_manifest_against_shards(dest, 32)
    assert manifest.num_samples == 240 and manifest.rejects == {} and manifest.duplicates_dropped == 0
    assert manifest.source.kind == "synthetic" and manifest.source.num_requested == 240
    assert manifest.config["partitions"] == 3
    assert manifest.source_info["heldout_combinations"] == [list(pair) for pair in HELDOUT_COMBINATIONS]
    assert "a large red star" in manifest.source_info["heldout_prompts"]
    assert {entry.partition for entry in manifest.shards} == {0, 1, 2} and len(manifest.shards) > 3
    assert all(entry.bytes <= 32 * 1024 + TAR_CLOSING for entry in manifest.shards)
    # The pixels are the generator's, up to JPEG at quality 95 (mean error of a few levels).
    members = samples["synthetic-00001-0000100"]
    scene = generate_scene(0, 100, image_size=32)
    decoded = np.asarray(Image.open(io.BytesIO(members["jpg"])), dtype=float)
    assert np.abs(decoded - scene.image).mean() < 4
    assert members["txt"].decode() == scene.caption
    assert json.loads(members["json"])["objects"] == scene.metadata["objects"]

    # A rerun of a finished ingest resumes every partition and rewrites nothing.
    again = ingest("synthetic", dest, **options)
    assert again.stats["partitions_resumed"] == 3 and again.shards == manifest.shards
    with pytest.raises(IngestError, match="different ingest"):
        ingest("synthetic", dest, num_samples=240, image_size=32, partitions=3, seed=1, progress=False)


def test_digits_ingest_to_ceph_and_the_dataset_can_be_moved(ray_local, s3_ceph):
    dest = s3_ceph.url("digits")
    manifest = ingest("digits", dest, num_samples=150, image_size=32, partitions=2, progress=False)
    assert all(entry.url.startswith(dest + "/shard-") for entry in manifest.shards)
    manifest, samples = check_manifest_against_shards(dest, 32)
    assert manifest.num_samples == 150
    assert {json.loads(m["json"])["label"] for m in samples.values()} == set(range(10))

    moved = s3_ceph.url("moved")
    fs, _ = storage.filesystem(dest)
    for url in storage.list_files(dest):
        name = url.rsplit("/", 1)[-1]
        if name.endswith((".tar", ".json")):
            fs.copy(url, storage.join(moved, name))
    relocated = load_manifest(moved)
    assert relocated.shard_urls()[0].startswith(moved) and relocated.sha256() == manifest.sha256()
    check_manifest_against_shards(moved, 32)


def test_exact_duplicates_are_dropped_across_partitions(ray_local, tmp_path):
    folder = tmp_path / "dups"
    make_folder(folder, {f"a{i}": i for i in range(10)})
    make_folder(folder, {"a3x": 3, "z0": 0})  # byte-identical copies, in the same and another partition
    # The same pixels as a0..., re-encoded losslessly as PNG: a different file, the same decoded image.
    Image.open(folder / "a1.jpg").save(folder / "z1.png")
    (folder / "z1.txt").write_text("same picture, other caption")
    dest = str(tmp_path / "ds")
    manifest = ingest(str(folder), dest, num_samples=None, image_size=32, partitions=3, progress=False)
    manifest, samples = check_manifest_against_shards(dest, 32)
    assert manifest.num_samples == 10
    assert manifest.rejects == {"duplicate": 3} and manifest.duplicates_dropped == 3
    hashes = [json.loads(m["json"])["pixel_sha256"] for m in samples.values()]
    assert len(set(hashes)) == 10


def test_bad_records_are_counted_by_reason_or_raise_when_strict(ray_local, tmp_path):
    folder = tmp_path / "messy"
    make_folder(folder, {f"ok{i}": i for i in range(6)})
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (folder / "garbage.txt").write_text("a caption for nothing")
    Image.new("RGB", (8, 8), "red").save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("too small to use")
    (folder / "blank.jpg").write_bytes(jpeg_bytes(50))
    (folder / "blank.txt").write_text("   \n")
    (folder / "nocaption.jpg").write_bytes(jpeg_bytes(51))
    manifest = ingest(str(folder), str(tmp_path / "ds"), image_size=32, partitions=2, progress=False)
    assert manifest.num_samples == 6
    assert manifest.rejects == {"empty_caption": 1, "missing_caption": 1, "too_small": 1, "undecodable": 1}
    with pytest.raises(
        IngestError, match=r"folder-\d{5}-\d{7} rejected \((undecodable|too_small|empty|missing)"
    ):
        ingest(
            str(folder), str(tmp_path / "strict"), image_size=32, partitions=2, strict=True, progress=False
        )

    shards = tmp_path / "shards"
    shards.mkdir()
    write_wds(shards / "good.tar", [(f"{i:09d}", jpeg_bytes(60 + i), f"good {i}") for i in range(5)])
    with tarfile.open(shards / "hostile.tar", "w") as archive:
        add_member(archive, "../evil.jpg", jpeg_bytes(70))
        add_member(archive, "../evil.txt", b"escape")
        add_member(archive, "000000001.jpg", jpeg_bytes(71))
        add_member(archive, "000000001.txt", b"kept")
    write_wds(tmp_path / "whole.tar", [(f"{i:09d}", jpeg_bytes(80 + i), f"cut {i}") for i in range(6)])
    whole = (tmp_path / "whole.tar").read_bytes()
    (shards / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 700])
    dest = str(tmp_path / "from-tars")
    manifest = ingest(str(shards), dest, image_size=32, partitions=3, progress=False)
    _, samples = check_manifest_against_shards(dest, 32)
    assert manifest.rejects["unsafe_member"] == 2 and manifest.rejects["corrupt_shard"] == 1
    captions = sorted(m["txt"].decode() for m in samples.values())
    assert [c for c in captions if c.startswith("good")] == [
        f"good {i}" for i in range(5)
    ] and "kept" in captions
    assert not any("evil" in json.loads(m["json"]).get("source_key", "") for m in samples.values())


def shard_table(manifest) -> list[tuple[str, int, str]]:
    return [(entry.name, entry.num_samples, entry.sha256) for entry in manifest.shards]


def test_strict_failure_then_rerun_equals_an_uninterrupted_run(ray_local, tmp_path):
    folder = tmp_path / "src"
    make_folder(folder, {f"img{i:02d}": 100 + i for i in range(12)})
    (folder / "zz.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # sorts last: the last partition fails
    (folder / "zz.txt").write_text("broken")
    dest = str(tmp_path / "resumed")
    with pytest.raises(IngestError, match="undecodable"):
        ingest(str(folder), dest, image_size=32, partitions=3, strict=True, progress=False)
    assert not storage.exists(storage.join(dest, "manifest.json"))
    assert not storage.exists(marker_url(dest, 2))
    resumed = ingest(str(folder), dest, image_size=32, partitions=3, progress=False)
    reference = ingest(str(folder), str(tmp_path / "reference"), image_size=32, partitions=3, progress=False)
    assert shard_table(resumed) == shard_table(reference) and resumed.rejects == {"undecodable": 1}
    check_manifest_against_shards(dest, 32)


KILLABLE_INGEST = """
import sys
from cluster.runtime import init_ray
from data_pipeline.ingest import ingest
init_ray("local", num_cpus=1, _temp_dir=sys.argv[2])
ingest("synthetic", sys.argv[1], num_samples=600, image_size=32, partitions=8, progress=False)
"""


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_ingest_resumes_to_the_same_dataset(ray_local, tmp_path):
    dest = str(tmp_path / "killed")
    ray_dir = tempfile.mkdtemp(prefix="ray-kill-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_INGEST, dest, ray_dir], cwd=REPO, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not storage.exists(marker_url(dest, 0)) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert storage.exists(marker_url(dest, 0)), "the ingest never finished a partition"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session we started: driver, raylet, workers
        proc.wait(timeout=30)
    finally:
        for pid in processes_mentioning(ray_dir):  # Ray daemons of that private cluster, if any outlived it
            os.kill(pid, signal.SIGKILL)
    assert not storage.exists(storage.join(dest, "manifest.json"))
    finished = [p for p in range(8) if storage.exists(marker_url(dest, p))]
    assert 0 < len(finished) < 8, finished

    resumed = ingest("synthetic", dest, num_samples=600, image_size=32, partitions=8, progress=False)
    assert resumed.stats["partitions_resumed"] == len(finished)
    reference = ingest(
        "synthetic", str(tmp_path / "ref"), num_samples=600, image_size=32, partitions=8, progress=False
    )
    assert shard_table(resumed) == shard_table(reference)
    check_manifest_against_shards(dest, 32)


def test_cli_ingest_reads_the_config_flags_and_overrides(ray_local, tmp_path):
    from cluster.commands import ingest as command

    parser = argparse.ArgumentParser(prog="tessera")
    command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "ingest",
            "--config",
            str(REPO / "configs/ingest/tiny.toml"),
            "--source",
            "synthetic",
            "--split",
            "heldout",
            "--num-samples",
            "60",
            "--dest",
            str(tmp_path / "cli"),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "ingest.partitions=2",
            "--set",
            "ingest.progress=false",
        ]
    )
    summary = command.run(args)
    assert summary["samples"] == 60 and summary["partitions"] == 2 and summary["shards"] >= 2
    assert json.loads((tmp_path / "run" / "ingest-summary.json").read_text()) == summary
    manifest, samples = check_manifest_against_shards(str(tmp_path / "cli"), 32)
    assert manifest.config["image_size"] == 32 and manifest.source.split == "heldout"
    assert all(contains_heldout(json.loads(m["json"])) for m in samples.values())


def verify_exit_code(manifest_url: str, run_dir: Path) -> tuple[int, dict]:
    from cluster.commands import verify as command

    parser = argparse.ArgumentParser(prog="tessera")
    command.register(parser.add_subparsers())
    args = parser.parse_args(["verify", "--manifest", manifest_url, "--run-dir", str(run_dir)])
    code = command.main(args)
    return code, json.loads((run_dir / "verify-report.json").read_text())


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_rerun_verifies_shards_rebuilds_damaged_partitions_and_removes_crash_leftovers(ray_local, tmp_path):
    dest = tmp_path / "ds"
    options = dict(num_samples=90, image_size=32, partitions=3, shard_max_samples=15, progress=False)
    original = ingest("synthetic", str(dest), **options)
    by_partition = {entry.partition: entry.name for entry in original.shards}
    (dest / by_partition[0]).unlink()
    flipped = bytearray((dest / by_partition[1]).read_bytes())
    flipped[len(flipped) // 3] ^= 0x10  # same size: only the sha256 can tell
    (dest / by_partition[1]).write_bytes(bytes(flipped))
    half_published = dest / f"{by_partition[2]}.tmp-0badc0de"
    half_published.write_bytes(b"a crash mid-publish")
    orphan = Path(tempfile.gettempdir()) / f"tessera-shard-{dead_pid()}-crashed.tar"
    orphan.write_bytes(b"a killed task's shard")

    code, report = verify_exit_code(str(dest), tmp_path / "v1")
    assert code == 1 and report["ok"] == len(original.shards) - 2
    assert report["problems"][by_partition[0]] == "missing"
    assert report["problems"][by_partition[1]].startswith("sha256 ")

    rerun = ingest("synthetic", str(dest), **options)
    assert rerun.stats["partitions_rebuilt"] == 2 and rerun.stats["partitions_resumed"] == 1
    assert shard_table(rerun) == shard_table(original)
    # The data's identity ignores when it was built and how the ingest went; the manifest's bytes do not.
    assert rerun.content_id() == original.content_id() and rerun.sha256() != original.sha256()
    assert not half_published.exists() and not orphan.exists()
    check_manifest_against_shards(str(dest), 32)
    code, report = verify_exit_code(str(dest), tmp_path / "v2")
    assert code == 0 and report["problems"] == {} and report["ok"] == len(original.shards)


def test_a_resumed_partition_cannot_readmit_a_duplicate_kept_elsewhere(ray_local, tmp_path):
    folder = tmp_path / "dups"
    make_folder(folder, {f"a{i}": i for i in range(6)})
    make_folder(folder, {"z0": 0})  # a copy of a0: a0 sorts into partition 0, z0 into partition 1
    dest = str(tmp_path / "ds")
    first = ingest(str(folder), dest, image_size=32, partitions=2, progress=False)
    assert first.duplicates_dropped == 1 and first.num_samples == 6
    markers = {p: json.loads(storage.read_bytes(marker_url(dest, p))) for p in (0, 1)}
    # Either partition may have claimed the pixels first; the other one dropped its copy.
    loser = next(p for p, marker in markers.items() if marker["rejects"] == {"duplicate": 1})
    storage.remove(marker_url(dest, loser))  # as if the ingest died before the loser finished
    resumed = ingest(str(folder), dest, image_size=32, partitions=2, progress=False)
    assert resumed.stats["partitions_resumed"] == 1
    assert resumed.duplicates_dropped == 1 and resumed.num_samples == 6
    _, samples = check_manifest_against_shards(dest, 32)
    assert len({json.loads(m["json"])["pixel_sha256"] for m in samples.values()}) == 6


OUTAGE_S = 30  # the point of the test: longer than any client-side retry inside s3fs/botocore


def test_ingest_and_loader_ride_out_a_30s_gateway_outage(ray_local, s3_ceph, tmp_path):
    """The real Ceph gateway is killed while an ingest writes to it and a loader reads from it;
    30 s later it is started again. Both finish, and what they produced or delivered is whole."""
    dataset = upload(write_dataset(str(tmp_path / "local"), UNEVEN), s3_ceph.url("outage-read"))
    # One-shard windows: the worker fetches shard after shard, so reads fall inside the outage (a
    # window of every shard would be fetched whole before the gateway goes down).
    loader = open_loader(
        dataset.location, rank=0, world_size=1, batch_size=2, seed=0, num_workers=1, window_shards=1
    )
    ledger = SampleLedger()
    batches = iter(loader)
    ledger.record(next(batches))

    dest = s3_ceph.url("outage-write")
    outcome: dict[str, object] = {}

    def run_ingest() -> None:
        try:
            outcome["manifest"] = ingest(
                "synthetic",
                dest,
                # 12 partitions on 2 Ray CPUs: most are still to write when the first one finishes.
                num_samples=480,
                image_size=32,
                partitions=12,
                shard_max_samples=10,
                progress=False,
            )
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    writer = threading.Thread(target=run_ingest)
    writer.start()
    deadline = time.monotonic() + 180
    while not storage.exists(marker_url(dest, 0)) and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.is_alive(), outcome.get("error") or "the ingest finished before the outage began"
    stop_gateway(s3_ceph)
    restart = threading.Timer(OUTAGE_S, start_gateway, args=(s3_ceph,))
    restart.start()
    try:
        for batch in batches:  # the reads stall through the outage, then go on
            ledger.record(batch)
        writer.join(timeout=600)
    finally:
        restart.join()
    assert "error" not in outcome, outcome.get("error")
    ledger.check_exactly_once(manifest_keys(dataset), epoch=0)
    manifest, _ = check_manifest_against_shards(dest, 32)
    assert manifest.num_samples == 480
