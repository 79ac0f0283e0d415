"""Real services for the test session: Ceph RGW, a moto S3 server, an MLflow tracking server.

Each starts on 127.0.0.1 with free ports and is stopped by PID (never ``pkill``/``ray stop``: other
people's processes share the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from trainer.net import free_port

REPO = Path(__file__).resolve().parents[1]
CEPH_SCRIPT = REPO / "infra" / "object-store-ceph.sh"
CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin")


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as exc:  # refused / reset / HTTP error
            if hasattr(exc, "code"):
                return  # an HTTP error status still means the server is up
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class S3Store:
    """An S3-compatible endpoint with credentials and one bucket for the tests."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    stop_pids: list[int] = field(default_factory=list)
    ceph_dir: Path | None = None  # Ceph stores: the folder holding ceph.conf and run/*.pid

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def url(self, prefix: str) -> str:
        """A fresh ``s3://`` prefix so tests never see each other's objects."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex[:8]}"

    def create_bucket(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )
        if not fs.exists(self.bucket):
            fs.mkdir(self.bucket)


def start_ceph(workdir: Path) -> S3Store:
    missing = [name for name in CEPH_BINARIES if shutil.which(name) is None]
    if missing:
        raise RuntimeError(
            f"Ceph binaries missing ({', '.join(missing)}): `make test` installs them "
            "(apt-get install radosgw ceph-mon ceph-osd)"
        )
    port, mon_port = free_port(), free_port()
    subprocess.run(
        ["bash", str(CEPH_SCRIPT), str(workdir), str(port), str(mon_port)],
        check=True,
        timeout=240,
        stdout=subprocess.DEVNULL,
    )
    pids = [int(p.read_text()) for p in (workdir / "run").glob("*.pid")]
    store = S3Store(f"http://127.0.0.1:{port}", "testkey", "testsecret", "tessera-test", pids, workdir)
    store.create_bucket()
    return store


RGW_NAME = "client.rgw.a"  # the gateway's name in infra/object-store-ceph.sh


def _gateway_pid(store: S3Store) -> int:
    return int((store.ceph_dir / "run" / f"{RGW_NAME}.pid").read_text())


def stop_gateway(store: S3Store, timeout: float = 30) -> None:
    """Kill the Ceph RADOS Gateway, the S3 endpoint, as a crash would; the cluster behind it stays up."""
    pid = _gateway_pid(store)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed daemon is a zombie until init reaps it: gone enough)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def start_gateway(store: S3Store, timeout: float = 60) -> None:
    """Start the gateway again on the same port; the store's objects are all still there."""
    old = _gateway_pid(store)
    subprocess.run(
        ["radosgw", "-c", str(store.ceph_dir / "ceph.conf"), "-n", RGW_NAME], check=True, timeout=timeout
    )
    deadline = time.monotonic() + timeout
    while _gateway_pid(store) == old and time.monotonic() < deadline:
        time.sleep(0.05)
    store.stop_pids = [pid for pid in store.stop_pids if pid != old] + [_gateway_pid(store)]
    wait_for_http(store.endpoint + "/", timeout)


def start_moto() -> tuple[S3Store, object]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    store = S3Store(f"http://{host}:{port}", "motokey", "motosecret", "tessera-moto")
    store.create_bucket()
    return store, server


def stop_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@dataclass
class MlflowServer:
    """An ``mlflow server`` process with a SQLite backend and artifacts proxied to S3."""

    db_path: Path
    artifacts_uri: str
    s3: S3Store
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        env = {
            **os.environ,
            **self.s3.env,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db_path}",
            "--artifacts-destination",
            self.artifacts_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.db_path.with_suffix(".log"), "ab")  # noqa: SIM115 - outlives this call with the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        wait_for_http(f"{self.uri}/health", timeout, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def run_dist_script(script: str, out: Path, workdir: Path, nproc: int = 2) -> dict:
    """Run ``tests/dist/<script>`` as ``nproc`` torchrun ranks (gloo, DeepSpeed on CPU); return its JSON.

    Many configs share one launch because each launch costs seconds of process and gloo start-up.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "dist" / script),
        str(out),
        str(workdir),
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
