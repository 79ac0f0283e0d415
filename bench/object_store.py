"""The object store a benchmark reads and writes: a single-node Ceph RGW started for the run.

``infra/object-store-ceph.sh`` as tests/conftest.py starts it; a moto server in a subprocess when the
Ceph binaries are missing (the caller's output then says so: those are not Ceph numbers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.net import free_port  # noqa: E402

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin")
ACCESS_KEY, SECRET_KEY, BUCKET = "benchkey", "benchsecret", "tessera-bench"


def start_store(workdir: Path) -> tuple[str, str, list[subprocess.Popen | int]]:
    """(kind, endpoint, things to stop): Ceph RGW when installed, else a moto server process."""
    port = free_port()
    if all(shutil.which(name) for name in CEPH_BINARIES):
        env = {**os.environ, "CEPH_ACCESS_KEY": ACCESS_KEY, "CEPH_SECRET_KEY": SECRET_KEY}
        subprocess.run(
            ["bash", str(ROOT / "infra" / "object-store-ceph.sh"), str(workdir), str(port), str(free_port())],
            check=True,
            timeout=240,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        return (
            "ceph-rgw",
            f"http://127.0.0.1:{port}",
            [int(p.read_text()) for p in (workdir / "run").glob("*.pid")],
        )
    print("Ceph binaries missing: falling back to a moto server (numbers are NOT Ceph numbers)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    return "moto", f"http://127.0.0.1:{port}", [proc]


def stop_store(handles: list[subprocess.Popen | int]) -> None:
    for handle in handles:
        if isinstance(handle, subprocess.Popen):
            handle.terminate()
            handle.wait(timeout=20)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle, signal.SIGTERM)


def store_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the store's daemons, from /proc (they are not our children)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def use_store(endpoint: str) -> None:
    """Point this process (and the processes it starts) at the store, and create the bucket."""
    import s3fs

    os.environ.update(
        {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    )
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(BUCKET)


def pids_of(handles: list[subprocess.Popen | int]) -> list[int]:
    return [h.pid if isinstance(h, subprocess.Popen) else h for h in handles]
