"""Ray as a user's cluster sees it: no object-store secret in Ray's logs unless forwarding is requested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from data_pipeline import storage

# A driver with a planted secret starts a local Ray, as `tessera ingest` does, and runs a task the way
# ingest does. (Forwarding the secret, the old default, writes it to runtime_env_agent.log: a planted
# forwards_secrets() -> True fails this test.)
SECRET_PROBE = """
import json, os, sys
import ray
from cluster.runtime import init_ray, shutdown_ray
from data_pipeline import storage

init_ray("local", num_cpus=1, _temp_dir=sys.argv[1])
read = ray.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY"))  # what an S3 reader would use
seen = ray.get(read.options(runtime_env={"env_vars": storage.ray_task_env()}).remote())
shutdown_ray()
print(json.dumps({"inherited": seen == os.environ["AWS_SECRET_ACCESS_KEY"]}))
"""


def files_containing(folder: Path, text: str) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_socket() and text.encode() in path.read_bytes():
            found.append(str(path.relative_to(folder)))
    return found


def test_secret_stays_out_of_ray_logs_unless_forwarding_is_requested(monkeypatch):
    planted = f"planted-secret-{uuid.uuid4().hex}"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": planted, "AWS_ACCESS_KEY_ID": "planted-id"}
    env.pop("TESSERA_FORWARD_CREDENTIALS", None)  # conftest opts the test session in; a user has not
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    out = subprocess.run(
        [sys.executable, "-c", SECRET_PROBE, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # A local cluster inherits the driver's environment: its tasks reach S3 without forwarding.
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"inherited": True}
    assert files_containing(folder, planted) == []
    assert planted not in out.stdout + out.stderr

    # Opting in forwards the secrets (with a warning from init_ray); by default only the endpoint goes.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", planted)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("TESSERA_FORWARD_CREDENTIALS")
    assert storage.ray_task_env().get("AWS_SECRET_ACCESS_KEY") is None
    assert storage.ray_task_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    monkeypatch.setenv("TESSERA_FORWARD_CREDENTIALS", "1")
    assert storage.ray_task_env()["AWS_SECRET_ACCESS_KEY"] == planted


def test_tracking_uri_with_a_password_is_not_forwarded_by_default(monkeypatch):
    from cluster.launch import _worker_env
    from cluster.runtime import worker_env

    monkeypatch.delenv("TESSERA_FORWARD_CREDENTIALS")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:planted-password@mlflow:5000")
    assert "MLFLOW_TRACKING_URI" not in worker_env() and "MLFLOW_TRACKING_URI" not in _worker_env()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # no credential in it: forwarded
    assert worker_env()["MLFLOW_TRACKING_URI"] == _worker_env()["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    monkeypatch.setenv("TESSERA_FORWARD_CREDENTIALS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:planted-password@mlflow:5000")
    assert "planted-password" in worker_env()["MLFLOW_TRACKING_URI"]
