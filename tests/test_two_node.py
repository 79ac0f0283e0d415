"""A real 2-node Ray cluster: two network namespaces ("hosts") joined by a veth pair.

Namespace A holds the Ray head (and every driver: the root namespace cannot reach these addresses),
namespace B a Ray worker node; each has its own address on an interface named ``eth1`` in both, so
``GLOO_SOCKET_IFNAME=eth1`` holds on both hosts. Ray control traffic and the ranks' gloo collectives
cross the veth pair. Storage is a folder both namespaces see (a shared filesystem) and MLflow a
SQLite store. The fixture creates the namespaces, addresses and processes and removes them by PID
and by the names it made up (never ``ray stop``); without root it skips, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from data_pipeline.ledger import manifest_keys
from data_pipeline.manifest import load_manifest
from data_pipeline.step_ledger import ledger_path, read_committed, read_lines
from trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEADLINE_S = 600  # a loaded 2-core box: a Ray head alone has taken over a minute to come up


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE_S, poll: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (and return that)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


@dataclass
class TwoNodes:
    head_ns: str
    worker_ns: str
    head_ip: str
    worker_ip: str
    port: int
    dashboard_port: int
    head: subprocess.Popen
    worker: subprocess.Popen
    scratch: Path

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",  # `python` of the Ray job is the venv's
            # "0" makes Ray refuse multi-node clusters ("Multi-node Ray clusters are not supported").
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_AUTH_MODE": "disabled",
            "GLOO_SOCKET_IFNAME": "eth1",
        }

    def tessera(self, *args: str, wait: bool = True):
        """A ``tessera`` command run on host A (the head's namespace); output goes to files (no pipe
        fills up while a test polls). Waits and returns (stdout, stderr), or returns the process."""
        command = ["ip", "netns", "exec", self.head_ns, sys.executable, "-m", "cluster.cli", *args]
        log = Path(tempfile.mkstemp(prefix="tessera-", suffix=".log", dir=self.scratch)[1])
        with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
            proc = subprocess.Popen(command, cwd=REPO, env=self.env(), stdout=out, stderr=err, text=True)
        proc.out_path, proc.err_path = log, log.with_suffix(".err")
        return finish(proc) if wait else proc

    def node_of(self, pid: int) -> str:
        """Which host a (finished) Ray worker process ran on: its log file lies in that node's temp dir."""
        hosts = [
            h for h in "ab" if list((self.scratch / f"ray-{h}").glob(f"session_*/logs/worker-*-{pid}.out"))
        ]
        assert len(hosts) == 1, f"worker {pid} found on hosts {hosts}"
        return hosts[0]

    def raylet_pid(self, node: subprocess.Popen) -> int:
        """The raylet ``ray start`` launched for this node (a child of the process we started)."""
        children = psutil.Process(node.pid).children(recursive=True)
        return next(child.pid for child in children if child.name() == "raylet")


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for a command started by ``TwoNodes.tessera``; its (stdout, stderr), asserting success."""
    proc.wait(timeout=DEADLINE_S)
    out, err = proc.out_path.read_text(), proc.err_path.read_text()
    assert proc.returncode == 0, f"{proc.args[5:]} failed ({proc.returncode}):\n{err[-3000:]}\n{out[-3000:]}"
    return out, err


def _start_node(namespace: str, env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, str(VENV_BIN / "ray"), "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with killpg, nothing else
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_for_nodes(cluster: TwoNodes, count: int) -> None:
    """Inside host A: the dashboard answers and ``count`` nodes are alive (one process polls)."""
    script = textwrap.dedent(f"""
        import time, ray
        from ray.job_submission import JobSubmissionClient
        deadline = time.monotonic() + {DEADLINE_S}
        while True:
            try:
                JobSubmissionClient("http://{cluster.head_ip}:{cluster.dashboard_port}").list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.5)
        ray.init(address="{cluster.address}", logging_level="ERROR")
        while sum(node["Alive"] for node in ray.nodes()) < {count}:
            assert time.monotonic() < deadline, f"only {{ray.nodes()}}"
            time.sleep(0.5)
        """)
    command = ["ip", "netns", "exec", cluster.head_ns, sys.executable, "-c", script]
    subprocess.run(command, env=cluster.env(), check=True, timeout=DEADLINE_S + 60)


@pytest.fixture(scope="module")
def two_nodes():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("2-node tests need root and iproute2 (`ip netns`) to create network namespaces")
    pid = os.getpid()
    head_ns, worker_ns, subnet = f"tsr{pid}a", f"tsr{pid}b", 20 + pid % 200
    head_ip, worker_ip = f"10.77.{subnet}.1", f"10.77.{subnet}.2"
    scratch = Path(tempfile.mkdtemp(prefix="two-node-", dir="/tmp"))
    made: list[str] = []
    started: list[subprocess.Popen] = []
    try:
        for namespace in (head_ns, worker_ns):
            try:
                _ip("netns", "add", namespace)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot create a network namespace: {exc.stderr.strip()}")
            made.append(namespace)
        _ip("link", "add", f"tv{pid}a", "type", "veth", "peer", "name", f"tv{pid}b")
        for namespace, end, address in ((head_ns, "a", head_ip), (worker_ns, "b", worker_ip)):
            _ip("link", "set", f"tv{pid}{end}", "netns", namespace)
            _ip("-n", namespace, "link", "set", f"tv{pid}{end}", "name", "eth1")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth1")
            _ip("-n", namespace, "link", "set", "eth1", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

        from trainer.net import free_port  # a free port here is free in a fresh namespace too

        port, dashboard = free_port(), free_port()
        common = ["--disable-usage-stats", "--num-cpus=1", "--object-store-memory=200000000"]
        env = TwoNodes(head_ns, worker_ns, head_ip, worker_ip, port, dashboard, None, None, scratch).env()
        head = _start_node(
            head_ns,
            env,
            [
                "--head",
                f"--node-ip-address={head_ip}",
                f"--port={port}",
                "--include-dashboard=true",
                f"--dashboard-host={head_ip}",
                f"--dashboard-port={dashboard}",
                f"--temp-dir={scratch / 'ray-a'}",
                *common,
            ],
            scratch / "head.log",
        )
        started.append(head)
        cluster = TwoNodes(head_ns, worker_ns, head_ip, worker_ip, port, dashboard, head, None, scratch)
        _wait_for_nodes(cluster, 1)
        cluster.worker = _start_node(
            worker_ns,
            env,
            [
                f"--address={cluster.address}",
                f"--node-ip-address={worker_ip}",
                f"--temp-dir={scratch / 'ray-b'}",
                *common,
            ],
            scratch / "worker.log",
        )
        started.append(cluster.worker)
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        for proc in reversed(started):
            _stop(proc)
        for namespace in made:
            # Ray workers run in process groups of their own: whatever still runs in our namespaces is ours.
            listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
            for pid in map(int, listed.stdout.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Deleting a namespace removes the veth end inside it, and with it its peer.
            subprocess.run(["ip", "netns", "del", namespace], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(two_nodes: TwoNodes) -> str:
    """128 synthetic 32 px samples, ingested by tasks on both nodes into the shared folder."""
    dest = str(two_nodes.scratch / "data")
    two_nodes.tessera(
        *("ingest", "--source", "synthetic", "--num-samples", "128", "--image-size", "32"),
        *("--partitions", "2", "--dest", dest, "--run-dir", str(two_nodes.scratch / "ingest")),
        *("--ray-address", two_nodes.address),
    )
    return dest


def train_args(cluster: TwoNodes, data: str, run_dir: Path, total_steps: int) -> list[str]:
    settings = {
        "data.manifest": f"'{data}'",
        "data.num_workers": 0,
        "data.validation_batch_size": 4,
        "dvae.grid_images": 4,
        "engine.micro_batch_size": 2,  # 2 ranks x 2 = 4 samples a step: 32 steps an epoch
        "engine.total_steps": total_steps,
        "engine.warmup_steps": 1,
        "run.checkpoint_every": 4,
        "run.eval_every": 100,
        "run.log_every": 4,
        "dvae.kl_warmup_steps": 4,
        "dvae.temperature_anneal_steps": total_steps,
    }
    return [
        *("train", "dvae", "--config", "configs/dvae/tiny.toml", "--run-dir", str(run_dir)),
        *("--launcher", "ray", "--num-workers", "2", "--ray-address", cluster.address),
        *[item for key, value in settings.items() for item in ("--set", f"{key}={value}")],
    ]


def summary_of(stdout: str) -> dict:
    """The JSON summary ``tessera train`` prints: the last block opening with a bare ``{`` line (Ray may
    print worker lines after it)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{\n")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def test_train_dvae_one_rank_per_node(two_nodes, dataset, tmp_path):
    run_dir = tmp_path / "dvae"
    out, _ = two_nodes.tessera(*train_args(two_nodes, dataset, run_dir, total_steps=4))
    summary = summary_of(out)
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["resumed_from"] is None
    # One rank trained on each host (each rank's process, as its ledger names it; Ray picks which).
    assert {two_nodes.node_of(read_lines(str(run_dir), rank)[0]["pid"]) for rank in (0, 1)} == {"a", "b"}
    reading = read_committed(str(run_dir))
    assert reading.steps == {0: [1, 2, 3, 4], 1: [1, 2, 3, 4]} and reading.rolled_back == 0
    assert not reading.committed.duplicates(epoch=0)
    assert sum(reading.committed.per_rank(0).values()) == 4 * 2 * 2  # steps x ranks x micro batch


def test_killed_rank_resumes_from_checkpoint_exactly_once(two_nodes, dataset, tmp_path):
    """SIGKILL the rank on host B mid-run: Ray Train restarts the group, which resumes from the newest
    checkpoint; the committed ledger then holds every sample of the epoch once (none lost, none twice)."""
    run_dir = tmp_path / "dvae"
    total = 32  # one epoch of the 128 samples
    driver = two_nodes.tessera(*train_args(two_nodes, dataset, run_dir, total_steps=total), wait=False)
    host_b = _netns_of(two_nodes.worker.pid)

    def rank_on_b_past_a_checkpoint():
        assert driver.poll() is None, f"the run ended early:\n{driver.err_path.read_text()[-3000:]}"
        for rank in (0, 1):
            lines = read_lines(str(run_dir), rank) if os.path.exists(ledger_path(str(run_dir), rank)) else []
            if lines and lines[-1]["step"] >= 6:  # checkpoint 4 exists, steps 5-6 are not in one
                with contextlib.suppress(FileNotFoundError):
                    if _netns_of(lines[-1]["pid"]) == host_b:
                        return lines[-1]
        return None

    victim = wait_until(rank_on_b_past_a_checkpoint, "the rank on host B to pass step 6")
    os.kill(victim["pid"], signal.SIGKILL)
    out, _ = finish(driver)
    summary = summary_of(out)
    assert summary["steps"] == total and summary["start_step"] > 0 and summary["resumed_from"]
    assert [info.step for info in list_checkpoints(str(run_dir / "checkpoints"))][-1] == total

    reading = read_committed(str(run_dir))
    assert all(len(attempts) >= 2 for attempts in reading.attempts.values()), "no restart happened"
    assert reading.steps == {0: list(range(1, total + 1)), 1: list(range(1, total + 1))}
    expected = manifest_keys(load_manifest(dataset))
    delivered = reading.committed.delivered(epoch=0)
    report = {
        "expected": len(expected),
        "delivered": sum(delivered.values()),
        "duplicated": len(reading.committed.duplicates(0)),
        "lost": len(reading.committed.missing(expected, 0)),
        "rolled_back_redelivered": reading.rolled_back,
        "resumed_from_step": summary["start_step"],
    }
    print("ledger across the kill:", json.dumps(report))
    reading.committed.check_exactly_once(expected, epoch=0)


def test_submit_a_stage_to_the_cluster(two_nodes, tmp_path):
    dest = str(two_nodes.scratch / "submitted")
    out, err = two_nodes.tessera(
        *("submit", "--address", f"http://{two_nodes.head_ip}:{two_nodes.dashboard_port}", "--"),
        *("ingest", "--source", "synthetic", "--num-samples", "16", "--image-size", "32"),
        *("--partitions", "2", "--dest", dest, "--run-dir", str(tmp_path / "ingest")),
        *("--ray-address", "auto"),
    )
    assert '"manifest_sha256"' in out  # the job's own stdout, streamed back
    assert re.search(r"^job \S+: SUCCEEDED$", err, re.MULTILINE), err[-3000:]
    assert load_manifest(dest).num_samples + sum(load_manifest(dest).rejects.values()) == 16


def test_ingest_survives_losing_the_worker_node(two_nodes, tmp_path):
    """SIGKILL host B's raylet while partitions are still running: the lost tasks are retried on the head."""
    dest = tmp_path / "data"
    partitions, samples = 8, 320
    driver = two_nodes.tessera(
        *("ingest", "--source", "synthetic", "--num-samples", str(samples), "--image-size", "32"),
        *("--partitions", str(partitions), "--dest", str(dest), "--run-dir", str(tmp_path / "ingest")),
        *("--ray-address", two_nodes.address),
        wait=False,
    )

    def some_partitions_done():
        assert driver.poll() is None, (
            f"the ingest ended before the kill:\n{driver.err_path.read_text()[-3000:]}"
        )
        markers = list((dest / "_partitions").glob("part-*.json")) if dest.exists() else []
        return len(markers) or None

    done_at_kill = wait_until(some_partitions_done, "a first finished partition")
    os.kill(two_nodes.raylet_pid(two_nodes.worker), signal.SIGKILL)
    out, _ = finish(driver)
    assert done_at_kill < partitions

    manifest = load_manifest(str(dest))
    names = [shard.name for shard in manifest.shards]
    assert len(names) == len(set(names)), "a shard is listed twice"
    on_disk = sorted(path.name for path in dest.glob("*.tar"))
    assert on_disk == sorted(names), "a shard on disk is not in the manifest (or the reverse)"
    assert {name.split("-")[1] for name in names} == {f"{p:05d}" for p in range(partitions)}
    keys = manifest_keys(manifest)
    assert len(keys) == manifest.num_samples  # every key once
    assert manifest.num_samples + sum(manifest.rejects.values()) == samples
