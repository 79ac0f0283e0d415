"""`--ray-address` to a cluster whose nodes do not see the driver's run folder (issue 15).

A Ray head is started with `ray start` in its own mount namespace, with a tmpfs over the driver's run
folder: its workers see an empty folder where the driver has files, as on another machine. The driver
joins by address and runs Ray Train; rank 0's result must come back although nothing the workers write
under storage_path reaches the driver (the old result.json-in-a-checkpoint path fails here with
FileNotFoundError, as users saw).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainer.net import free_port

DRIVER = """
import json, os, sys
from cluster.launch import launch
from trainer.config import RunConfig

def train(config):
    import ray.train
    marker = os.path.join(sys.argv[2], "driver-only")
    return {"rank": ray.train.get_context().get_world_rank(), "sees_driver_folder": os.path.exists(marker)}

open(os.path.join(sys.argv[2], "driver-only"), "w").close()
address, folder = sys.argv[1:3]
result = launch(train, RunConfig(), mode="ray", num_workers=1, ray_address=address, storage_path=folder)
print(json.dumps(result))
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(1) for a private mount namespace")
def test_driver_whose_run_folder_the_workers_cannot_see(tmp_path):
    from ray._private.services import get_node_ip_address

    ip, port = get_node_ip_address(), free_port()
    run_folder = tmp_path / "driver-run"
    run_folder.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    head_command = (
        f"mount -t tmpfs none {run_folder} && exec {ray_bin} start --head --node-ip-address {ip} "
        f"--port {port} --num-cpus 1 --temp-dir {ray_tmp} --include-dashboard false --disable-usage-stats"
    )
    head = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", head_command],
        cwd=tempfile.mkdtemp(),  # not this directory either
        env=head_env,
        start_new_session=True,  # its own process group: the teardown ends exactly these processes
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert head.wait(timeout=180) == 0, head.stdout.read()  # `ray start` returns once the head is up
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, f"{ip}:{port}", str(run_folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"rank": 0, "sees_driver_folder": False}  # a separate folder, and the result
    finally:
        os.killpg(head.pid, signal.SIGKILL)
