"""``tessera submit`` against a real Ray head (``ray start --head`` with its dashboard's Jobs API)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.cli import main as tessera
from trainer.net import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    from ray.job_submission import JobSubmissionClient

    port, dashboard = free_port(), free_port()
    # On a real cluster `python` is the image's; here the venv's must come first on the head's PATH.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # Its own agent ports: another Ray on this machine (the suite's local cluster) holds the defaults.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={tempfile.mkdtemp(prefix='ray-head-', dir='/tmp')}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 300
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard never answered"
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)  # our own session: the head and everything it started
    head.wait(timeout=60)


def test_submit_streams_logs_and_keeps_credentials_out_of_the_job(ray_head, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-0123456789")
    argv = ["submit", "--address", ray_head, "--", "plan", "--config", "configs/dalle/tiny.toml"]
    assert tessera(argv) == 0
    captured = capsys.readouterr()
    assert "parameters" in captured.out.lower()  # the plan's table came back through the log stream
    job_id = captured.err.split("submitted ", 1)[1].split()[0]
    info = JobSubmissionClient(ray_head).get_job_info(job_id)
    assert info.status.value == "SUCCEEDED"
    assert (
        "planted-secret" not in str(info.runtime_env) and "planted-secret" not in captured.out + captured.err
    )
    assert tessera(["submit", "--address", ray_head, "--status", job_id]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
