"""MLflow tracking against a real SQLite store, a real tracking server (stopped and restarted for an
outage) and a real TCP socket that accepts connections and never answers."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import torch

from cluster.cli import main as tessera
from cluster.commands.demo import final_grids
from trainer.redaction import REDACTED, is_credential_key, redact, redact_command
from trainer.tracking import (
    Tracker,
    default_tracking_uri,
    flatten,
    image_grid,
    list_artifacts,
    read_run,
)

REPO = Path(__file__).resolve().parents[1]


def read_unsent(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tracking-unsent.jsonl").read_text().splitlines()]


def test_default_store_lineage_unique_names_and_model_registry(tmp_path, monkeypatch):
    """No URI set: every command in this working directory logs to ./runs/mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "dvae"
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"consolidated weights")
    (tmp_path / "notes.txt").write_text("hello")
    with Tracker("unit", "demo", run_dir=run_dir, tags={"stage": "dvae"}) as tracker:
        tracker.log_params(
            {
                "engine": {"lr": 0.1},
                "data": {"tokenizer": "tok.json"},
                "model": {"moe": {"drop_tokens": True}},
                "aws_secret_access_key": "abc",
            }
        )
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_image_grid(torch.rand(4, 3, 8, 8), "grids/sample.png", nrow=2)
        tracker.log_dict({"api_token": "t0k", "n": 1}, "reports/report.json")
        tracker.log_artifact(tmp_path / "notes.txt", "files")
        tracker.log_model_file(model, {"model": {"dim": 8}, "store": {"secret_key": "s"}}, register_as="tiny")
    with Tracker("unit", "demo", run_dir=run_dir, tags={"stage": "dvae"}) as rerun:
        pass
    uri = tracker.tracking_uri
    assert uri == default_tracking_uri() and (tmp_path / "runs" / "mlflow.db").exists()
    assert not (run_dir / "tracking-spool").exists()  # every staged artifact was uploaded
    run = read_run(uri, tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "engine.lr": "0.1",
        "data.tokenizer": "tok.json",
        "model.moe.drop_tokens": "True",
        "aws_secret_access_key": REDACTED,
    }
    assert run.data.metrics == {"loss": 1.0 / 3}
    assert list_artifacts(uri, tracker.run_id, "grids") == ["grids/sample.png"]
    assert list_artifacts(uri, tracker.run_id, "files") == ["files/notes.txt"]
    assert list_artifacts(uri, tracker.run_id, "model") == ["model/config.json", "model/model.safetensors"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
        (0, 1.0),
        (1, 0.5),
        (2, 1.0 / 3),
    ]
    report = json.loads(
        Path(client.download_artifacts(tracker.run_id, "reports/report.json", str(tmp_path))).read_text()
    )
    assert report == {"api_token": REDACTED, "n": 1}
    config = json.loads(
        Path(client.download_artifacts(tracker.run_id, "model/config.json", str(tmp_path))).read_text()
    )
    assert config == {"model": {"dim": 8}, "store": {"secret_key": REDACTED}}
    (version,) = client.search_model_versions("name = 'tiny'")
    assert version.run_id == tracker.run_id and version.source.endswith("/model")

    # Lineage: the code's commit, package versions, the command line; reruns get distinct names.
    tags = run.data.tags
    # The checkout's commit when the run started: HEAD or (others commit meanwhile) an ancestor of it.
    commit = tags["mlflow.source.git.commit"]
    ancestor = ["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"]
    assert len(commit) == 40 and subprocess.run(ancestor).returncode == 0
    assert tags["tessera.version.torch"] == torch.__version__
    assert {"tessera.version.mlflow", "tessera.version.deepspeed", "tessera.command"} <= set(tags)
    assert tags["stage"] == "dvae" and tags["tessera.run_name"] == "demo"
    second = read_run(uri, rerun.run_id)
    assert second.data.tags["tessera.run_name"] == "demo" and second.info.status == "FINISHED"
    assert run.info.run_name.startswith("demo-") and second.info.run_name != run.info.run_name


def test_redaction_hides_credentials_and_keeps_settings():
    data = {
        "store": {"secret_key": "s", "endpoint": "http://user:pw@host:9000", "region": "us"},
        "data": {"tokenizer": "runs/tok.json", "max_tokens": 77},
        "model": {"moe": {"drop_tokens": True}, "num_tokens": 16},
        "hf_token": "x",
        "accessToken": "y",
        "aws_secret_access_key": "z",
        "headers": ["Bearer abc.def-ghi"],
        "note": "key AKIAABCDEFGHIJKLMNOP in text",
        "author": "ada",
        "password": "",
    }
    clean = redact(data)
    assert clean["store"] == {
        "secret_key": REDACTED,
        "endpoint": f"http://{REDACTED}@host:9000",
        "region": "us",
    }
    assert clean["data"] == data["data"] and clean["model"] == data["model"]  # settings stay visible
    assert clean["hf_token"] == clean["accessToken"] == clean["aws_secret_access_key"] == REDACTED
    assert clean["headers"] == [REDACTED] and "AKIA" not in clean["note"]
    assert clean["author"] == "ada" and clean["password"] == ""
    assert not any(
        map(is_credential_key, ["tokenizer", "a.drop_tokens", "tokens_per_sample", "author", "key"])
    )
    command = redact_command(
        ["tessera", "train", "--set", "store.secret_key=abc", "--password", "pw", "--set", "a.b=1"]
    )
    assert command == f"tessera train --set store.secret_key={REDACTED} --password {REDACTED} --set a.b=1"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_image_grid_layout():
    images = torch.zeros(5, 3, 4, 4)
    images[4] = 1.0
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[11:15, 1:5] == 255).all() and (grid[1:5, 1:5] == 0).all()


class SilentServer:
    """A TCP server that accepts every connection and never reads or answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        for conn in self.connections:
            conn.close()  # the sender's pending request fails now


def test_hung_server_never_blocks_the_training_thread(run_dir, monkeypatch):
    server = SilentServer()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    steps = 50
    completed: list[int] = []
    loop_done = threading.Event()

    def training_loop(tracker: Tracker) -> None:
        for step in range(steps):
            tracker.log_metrics({"loss": float(step)}, step=step)
            completed.append(step)
        tracker.set_tags({"checkpoint.latest": "s3://bucket/ckpt/step-49"})
        loop_done.set()

    try:
        # A request timeout far longer than the test: only an enqueue-only log call can return.
        tracker = Tracker(
            "hung", "r", run_dir=run_dir, queue_size=8, request_timeout_s=600, close_timeout_s=1
        )
        assert server.accepted.wait(120), "the sender never tried to reach MLflow"
        tracker.log_params({"store": {"secret_key": "hung-secret-value"}})
        threading.Thread(target=training_loop, args=(tracker,), daemon=True).start()
        # Liveness, not speed: the loop can only finish while the server sits on the sender's request
        # if no log call waits on the network (a blocking call would wait the full 600 s timeout).
        assert loop_done.wait(60), f"only {len(completed)} of {steps} log calls returned while MLflow hung"
        assert len(server.connections) == 1  # still the sender's first request, unanswered
        tracker.close()
    finally:
        server.close()
    assert "hung-secret-value" not in (run_dir / "tracking-unsent.jsonl").read_text()
    records = read_unsent(run_dir)
    assert sorted(r["step"] for r in records if r["kind"] == "metric") == list(range(steps))
    tags = {r["key"]: r["value"] for r in records if r["kind"] == "tag"}
    assert tags["checkpoint.latest"] == "s3://bucket/ckpt/step-49"
    assert [r["status"] for r in records if r["kind"] == "status"] == ["FINISHED"]


def _metric_steps(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "loss")]


def test_outage_spills_then_replay_finishes_runs(mlflow_server, tmp_path):
    """Stop the real server mid-run; what the runs log after that is spilled at close, then replayed
    by ``tessera tracking replay`` (run A) and by the next Tracker in the same folder (run B)."""
    uri = mlflow_server.uri
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    run_a = Tracker("replay", "a", run_dir=dir_a, tracking_uri=uri, max_backoff_s=1)
    run_a.log_metrics({"loss": 0.0}, step=0)
    assert run_a.flush(timeout=120)
    run_a_id = run_a.run_id
    mlflow_server.stop()
    try:
        for step in (1, 2, 3):
            run_a.log_metrics({"loss": float(step)}, step=step)
        run_a.set_tags({"checkpoint.latest": "s3://bucket/a/step-3"})
        run_a.close("FAILED")
        with Tracker("replay", "b", run_dir=dir_b, tracking_uri=uri, max_backoff_s=1) as run_b:
            run_b.log_metrics({"loss": 5.0}, step=7)  # this run never reaches MLflow before it ends
        assert any(r.get("key") == "checkpoint.latest" for r in read_unsent(dir_a))
        assert [r["status"] for r in read_unsent(dir_a) if r["kind"] == "status"] == ["FAILED"]
    finally:
        mlflow_server.start()

    assert tessera(["tracking", "replay", "--run-dir", str(dir_a), "--tracking-uri", uri]) == 0
    assert not (dir_a / "tracking-unsent.jsonl").exists()
    replayed = read_run(uri, run_a_id)
    assert replayed.info.status == "FAILED" and replayed.info.end_time is not None
    assert replayed.data.tags["checkpoint.latest"] == "s3://bucket/a/step-3"
    assert _metric_steps(uri, run_a_id) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]

    with Tracker("replay", "next", run_dir=dir_b, tracking_uri=uri) as next_run:
        pass
    assert next_run.run_id and not (dir_b / "tracking-unsent.jsonl").exists()
    from mlflow.tracking import MlflowClient

    (found,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("replay").experiment_id],
        filter_string=f"attributes.run_name = '{run_b.run_name}'",
    )
    assert found.info.status == "FINISHED" and _metric_steps(uri, found.info.run_id) == [(7, 5.0)]


def test_no_secret_in_any_output(mlflow_server, run_dir, tmp_path, monkeypatch, capfd, caplog):
    """Credentials planted in the tracking URI, run name, params, tags, texts, env and command line."""
    caplog.set_level(logging.INFO)
    secrets = {
        name: f"{name}-{uuid.uuid4().hex[:12]}" for name in ("uri", "param", "tag", "url", "env", "argv")
    }
    aws_key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    bearer = uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["env"])
    monkeypatch.setattr(sys, "argv", ["tessera", "train", "--set", f"store.secret_key={secrets['argv']}"])
    host = mlflow_server.uri.removeprefix("http://")
    uri = f"http://alice:{secrets['uri']}@{host}"  # the server ignores basic auth: the run goes through
    with Tracker("secrets", f"run-{aws_key_id}", run_dir=run_dir, tracking_uri=uri) as tracker:
        tracker.log_params(
            {"store": {"secret_key": secrets["param"], "endpoint": f"http://bob:{secrets['url']}@s3"}}
        )
        tracker.set_tags({"auth_token": secrets["tag"], "source": f"key {aws_key_id}"})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_text(f"caption written with {secrets['env']} and Bearer {bearer}", "texts/caption.txt")
        tracker.log_dict({"headers": {"Authorization": f"Bearer {bearer}"}}, "reports/r.json")
        tracker.log_image_grid(torch.rand(2, 3, 8, 8), "grids/g.png")
    run = read_run(mlflow_server.uri, tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0}
    assert REDACTED in run.info.run_name and run.data.params["store.secret_key"] == REDACTED
    assert list_artifacts(mlflow_server.uri, tracker.run_id, "grids") == ["grids/g.png"]  # proxied to S3

    from mlflow.tracking import MlflowClient

    downloaded = Path(
        MlflowClient(mlflow_server.uri).download_artifacts(tracker.run_id, "", str(tmp_path / "dl"))
    )
    captured = capfd.readouterr()
    outputs = {
        "stdout": captured.out,
        "stderr": captured.err,
        "logs": caplog.text,
        "run name": run.info.run_name,
        "params": json.dumps(run.data.params),
        "tags": json.dumps(run.data.tags),
    }
    for path in [*run_dir.rglob("*"), *downloaded.rglob("*")]:
        if path.is_file():
            outputs[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert any("caption.txt" in name for name in outputs) and any("r.json" in name for name in outputs)
    for where, text in outputs.items():
        for secret in [*secrets.values(), aws_key_id, bearer]:
            assert secret not in text, f"{secret} leaked into {where}"


def test_the_demo_lists_each_runs_newest_grid_by_run_name(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with Tracker("unit", "dvae-tiny", run_dir=tmp_path / "runs" / "dvae") as dvae:
        for step in (200, 1000):  # zero-padded names: the last in sort order is the newest
            dvae.log_image_grid(torch.rand(2, 3, 8, 8), f"grids/step-{step:07d}.png", nrow=2)
    with Tracker("unit", "dalle-tiny", run_dir=tmp_path / "runs" / "dalle") as dalle:
        dalle.log_image_grid(torch.rand(2, 3, 8, 8), "grids/step-0000600.png", nrow=2)
    found = final_grids(default_tracking_uri())
    assert [(name, path.name, path.parents[2].name) for name, path in found] == [
        ("dalle-tiny", "step-0000600.png", dalle.run_id),
        ("dvae-tiny", "step-0001000.png", dvae.run_id),
    ]
