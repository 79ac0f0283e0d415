"""A tiny ingest run in the driver (no Ray) writes the same bytes as the same ingest on a real local Ray.

`tessera ingest` picks the in-process path for local ingests of at most IN_PROCESS_MAX_SAMPLES samples
(or one partition), so a 10-image ingest does not pay Ray's start-up; that choice is only safe if
both paths produce identical shards and manifests, which is what is checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.commands.ingest import IN_PROCESS_MAX_SAMPLES, runs_in_process
from data_pipeline import storage
from data_pipeline.ingest import ingest_config
from data_pipeline.manifest import load_manifest
from data_pipeline.prep_config import IngestConfig
from tests.test_sources import make_folder

# Differ between two otherwise identical ingests: when and how fast it ran, and where it was written.
RUN_SPECIFIC = ("stats", "created_at")


def dataset_bytes(dest: str) -> tuple[dict, dict[str, bytes]]:
    """The manifest (less run-specific fields) and every shard's bytes by file name."""
    manifest = load_manifest(dest).model_dump(mode="json", exclude=set(RUN_SPECIFIC))
    manifest["config"].pop("dest")
    shards = {}
    for entry in manifest["shards"]:
        shards[entry["name"]] = storage.read_bytes(entry.pop("url"))
    return manifest, shards


def test_in_process_ingest_writes_the_bytes_the_ray_ingest_writes(ray_local, tmp_path):
    folder = tmp_path / "photos"
    make_folder(folder, {f"a{i}": i for i in range(10)})
    make_folder(folder, {"a3x": 3})  # a byte-identical copy in the same partition: dedup must drop it
    (folder / "a7.jpg").write_bytes(b"not a jpeg")  # corrupt: rejected and counted on both paths

    def run(name: str, in_process: bool) -> tuple[dict, dict[str, bytes]]:
        config = IngestConfig(
            source=str(folder),
            dest=str(tmp_path / name),
            image_size=16,
            partitions=2,
            shard_max_samples=2,
            progress=False,
        )
        ingest_config(config, in_process=in_process)
        return dataset_bytes(str(tmp_path / name))

    local_manifest, local_shards = run("driver", in_process=True)
    ray_manifest, ray_shards = run("ray", in_process=False)
    assert local_manifest["num_samples"] == 9  # 11 files, one duplicate, one corrupt
    assert local_manifest["duplicates_dropped"] == 1 and local_manifest["rejects"]["duplicate"] == 1
    assert sum(local_manifest["rejects"].values()) == 2 and len(local_shards) >= 4
    assert local_manifest == ray_manifest
    assert local_shards.keys() == ray_shards.keys()
    assert all(local_shards[name] == ray_shards[name] for name in local_shards)


def test_tessera_ingest_of_a_few_samples_and_its_rerun_never_start_ray(tmp_path):
    """The real command twice on one dest: the first writes, the rerun verifies the shards and keeps
    them; Ray says "Started a local Ray instance" whenever one starts (init_ray or a stray remote call)."""
    dest = tmp_path / "ds"
    tessera = str(Path(sys.executable).parent / "tessera")
    argv = [tessera, "ingest", "--source", "synthetic", "--num-samples", "10", "--dest", str(dest)]
    argv += ["--image-size", "16", "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "TESSERA_FORWARD_CREDENTIALS": "0"}
    for rerun in (False, True):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Ray instance" not in done.stdout + done.stderr
        summary = json.loads(done.stdout[done.stdout.index("{") :])
        assert summary["samples"] == 10 and summary["partitions_resumed"] == (4 if rerun else 0)
    assert load_manifest(str(dest)).num_samples == 10


@pytest.mark.parametrize(
    ("choice", "address", "num_samples", "partitions", "expected"),
    [
        ("auto", "local", IN_PROCESS_MAX_SAMPLES, 4, True),
        ("auto", "local", IN_PROCESS_MAX_SAMPLES + 1, 4, False),
        ("auto", "local", None, 4, False),  # "all" of an external source: size unknown, Ray
        ("auto", "local", None, 1, True),  # one partition: Ray would run it on one core anyway
        ("auto", "auto", 10, 1, False),  # a cluster was named: always Ray
        ("yes", "auto", 10**6, 8, True),
        ("no", "local", 10, 1, False),
    ],
)
def test_which_ingests_run_in_process(choice, address, num_samples, partitions, expected):
    config = IngestConfig(num_samples=num_samples, partitions=partitions)
    assert runs_in_process(config, choice, address) is expected
