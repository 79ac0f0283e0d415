"""Session services: real Ceph RGW, moto S3, an MLflow server and a local Ray cluster.

Servers start once per session (lazily, only if a test asks for them) and are stopped by PID.
The function-scoped ``s3_ceph`` / ``s3_moto`` fixtures point the AWS_* environment at their store
for the duration of one test, so both stores can serve tests in the same session.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports torch, ray or deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tessera-torch-extensions"))
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their store explicitly
# The s3 fixtures switch throw-away credentials per test after the session's Ray cluster started, so its
# tasks need them forwarded (users opt in the same way; test_runtime checks the default forwards none).
os.environ.setdefault("TESSERA_FORWARD_CREDENTIALS", "1")

from tests.services import MlflowServer, S3Store, start_ceph, start_moto, stop_pids  # noqa: E402


@pytest.fixture(scope="session")
def _ceph_server(tmp_path_factory: pytest.TempPathFactory):
    # Ceph's socket paths must be short: use /tmp directly, not pytest's deep tmp path.
    workdir = Path(tempfile.mkdtemp(prefix="ceph-", dir="/tmp"))
    store = start_ceph(workdir)
    yield store
    stop_pids(store.stop_pids)


@pytest.fixture(scope="session")
def _moto_server():
    store, server = start_moto()
    yield store
    server.stop()


def _activate(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return store


@pytest.fixture
def s3_ceph(_ceph_server: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The real Ceph RADOS Gateway; AWS_* env points at it during the test."""
    return _activate(_ceph_server, monkeypatch)


@pytest.fixture
def s3_moto(_moto_server: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A moto S3 server (fast; accepts any credentials); AWS_* env points at it during the test."""
    return _activate(_moto_server, monkeypatch)


@pytest.fixture(scope="session")
def mlflow_server(_ceph_server: S3Store, tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server``: SQLite backend, artifacts proxied to the Ceph bucket."""
    server = MlflowServer(
        db_path=tmp_path_factory.mktemp("mlflow") / "mlflow.db",
        artifacts_uri=f"s3://{_ceph_server.bucket}/mlflow",
        s3=_ceph_server,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A private local Ray cluster (2 CPUs) shared by the session."""
    from cluster.runtime import init_ray, shutdown_ray

    init_ray("local", num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield
    shutdown_ray()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def _mlflow_store_per_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and the ranks it launches) logs to its own ``<tmp>/run/mlflow.db``, never to the
    checkout's ``./runs/mlflow.db`` (the default store when MLFLOW_TRACKING_URI is unset)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
