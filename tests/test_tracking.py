"""MLflow tracking against a real SQLite store and a real tracking server (with a real outage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.services import MlflowServer
from trainer.tracking import REDACTED, Tracker, image_grid, list_artifacts, read_run, redact


def test_embedded_sqlite_run_logs_everything(run_dir):
    with Tracker("unit", "r", run_dir=run_dir) as tracker:
        tracker.log_params({"engine": {"lr": 0.1}, "aws_secret_access_key": "abc"})
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_image_grid(torch.rand(4, 3, 8, 8), "grids/sample.png", nrow=2)
        tracker.log_dict({"api_token": "t0k", "n": 1}, "reports/report.json")
        (run_dir / "notes.txt").write_text("hello")
        tracker.log_artifact(run_dir / "notes.txt", "files")
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    run = read_run(tracker.tracking_uri, tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"engine.lr": "0.1", "aws_secret_access_key": REDACTED}
    history = tracker.client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert list_artifacts(tracker.tracking_uri, tracker.run_id, "grids") == ["grids/sample.png"]
    assert list_artifacts(tracker.tracking_uri, tracker.run_id, "files") == ["files/notes.txt"]
    report_path = tracker.client.download_artifacts(tracker.run_id, "reports/report.json", str(run_dir))
    assert json.loads(Path(report_path).read_text()) == {"api_token": REDACTED, "n": 1}


def test_redaction_rules():
    data = {
        "store": {"secret_key": "s", "endpoint": "http://user:pw@host:9000", "region": "us"},
        "hf_token": "x",
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
    assert clean["hf_token"] == REDACTED
    assert "AKIA" not in clean["note"]
    assert clean["author"] == "ada" and clean["password"] == ""


def test_image_grid_layout():
    images = torch.zeros(5, 3, 4, 4)
    images[4] = 1.0
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[11:15, 1:5] == 255).all() and (grid[1:5, 1:5] == 0).all()


def test_server_run_with_proxied_artifacts(mlflow_server, run_dir):
    tracker = Tracker("server", "r", run_dir=run_dir, tracking_uri=mlflow_server.uri)
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_image_grid(torch.rand(2, 3, 8, 8), "grids/g.png")
    tracker.close()
    assert read_run(mlflow_server.uri, tracker.run_id).data.metrics == {"loss": 2.0}
    assert list_artifacts(mlflow_server.uri, tracker.run_id, "grids") == ["grids/g.png"]


@pytest.mark.slow
def test_outage_buffers_and_flushes_when_server_returns(_ceph_server, tmp_path, run_dir, caplog):
    """Stop a real server mid-run: logging keeps working, and the data arrives once it is back."""
    server = MlflowServer(tmp_path / "outage.db", f"s3://{_ceph_server.bucket}/outage", _ceph_server)
    server.start()
    tracker = Tracker("outage", "r", run_dir=run_dir, tracking_uri=server.uri, flush_every_s=0)
    tracker.log_metrics({"loss": 1.0}, step=0)
    server.stop()
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)  # must not raise
    assert tracker.pending == 3
    assert "unreachable" in caplog.text
    server.start()
    try:
        tracker.log_metrics({"loss": 9.0}, step=4)
        assert tracker.pending == 0
        tracker.close()
        history = tracker.client.get_metric_history(tracker.run_id, "loss")
        assert [m.step for m in history] == [0, 1, 2, 3, 4]
    finally:
        server.stop()


def test_unreachable_at_close_spills_to_file(run_dir):
    tracker = Tracker("none", run_dir=run_dir, tracking_uri="http://127.0.0.1:9", flush_every_s=0)
    tracker.log_metrics({"loss": 1.5}, step=3)
    tracker.close()
    lines = (run_dir / "tracking-unsent.jsonl").read_text().splitlines()
    assert {"metric": "loss", "value": 1.5, "step": 3} in [json.loads(line) for line in lines]
