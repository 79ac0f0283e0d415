"""MLflow tracking that never takes a training run down.

The only module that imports mlflow. Everything is buffered and sent in batches; when the server
is unreachable the run keeps going, a warning says so, and the buffer is sent when the server
returns (or, at close, spilled to ``<run dir>/tracking-unsent.jsonl`` so nothing is lost).
Values that look like secrets are redacted before they leave the process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cluster.config import flatten

# Fail fast instead of mlflow's default of 7 retries with exponential backoff (minutes of blocking
# inside a training step); the buffer below is our retry. Users can still override both.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

REDACTED = "***REDACTED***"
SECRET_KEY_PATTERN = re.compile(
    r"(secret|token|passw|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth(?!or))", re.IGNORECASE
)
SECRET_VALUE_PATTERNS = (
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)bearer\s+[a-z0-9._\-]+"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


def redact_value(key: str, value: Any) -> Any:
    """Hide a value whose key names a secret, or whose text looks like a credential."""
    if SECRET_KEY_PATTERN.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        for pattern in SECRET_VALUE_PATTERNS:
            value = pattern.sub(REDACTED, value)
    return value


def redact(data: Any, key: str = "") -> Any:
    """Recursively redact a nested structure (configs, reports) before logging it."""
    if isinstance(data, Mapping):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, key) for v in data]
    return redact_value(key, data)


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store inside the run folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images (float in [0, 1] or uint8) into one ``(H', W', 3)`` uint8 array."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, channels, height, width = images.shape
    cols = min(nrow, count)
    rows = (count + cols - 1) // cols
    grid = torch.full(
        (channels, rows * (height + padding) + padding, cols * (width + padding) + padding),
        255,
        dtype=torch.uint8,
    )
    for index in range(count):
        top = padding + (index // cols) * (height + padding)
        left = padding + (index % cols) * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid.permute(1, 2, 0).numpy()


class Tracker:
    """One MLflow run: params, metrics by step, artifacts and image grids, buffered and non-fatal."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        *,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        flush_every_s: float = 5.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.flush_every_s = flush_every_s
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None
        self._spool = self.run_dir / "tracking-spool"
        self._metrics: list[Metric] = []
        self._params: list[Param] = []
        self._tags: list[RunTag] = [RunTag(k, str(redact_value(k, v))) for k, v in (tags or {}).items()]
        self._artifacts: list[tuple[str, str | None]] = []
        self._last_flush = 0.0
        self._outage_since: float | None = None
        self.flush(force=True)

    # -- public API ------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flatten(params).items():
            text = str(redact_value(key, value))[:MAX_PARAM_LENGTH]
            self._params.append(Param(key, text))
        self.flush(force=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.extend(RunTag(k, str(redact_value(k, v))) for k, v in tags.items())
        self.flush(force=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._metrics.append(Metric(key, float(value), now, int(step)))
        self.flush()

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy the file into the spool first, so a later outage or cleanup cannot lose it."""
        staged = self._stage(Path(local_path).name)
        shutil.copyfile(local_path, staged)
        self._artifacts.append((str(staged), artifact_path))
        self.flush(force=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        staged = self._stage(Path(artifact_file).name)
        staged.write_text(text)
        self._artifacts.append((str(staged), _artifact_dir(artifact_file)))
        self.flush(force=True)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str), artifact_file)

    def log_image_grid(self, images: torch.Tensor, artifact_file: str, nrow: int = 8) -> None:
        staged = self._stage(Path(artifact_file).name)
        Image.fromarray(image_grid(images, nrow=nrow)).save(staged)
        self._artifacts.append((str(staged), _artifact_dir(artifact_file)))
        self.flush(force=True)

    @property
    def pending(self) -> int:
        """How many params, tags, metrics and artifacts are waiting to be sent."""
        return len(self._metrics) + len(self._params) + len(self._tags) + len(self._artifacts)

    def flush(self, force: bool = False) -> bool:
        """Send everything buffered; returns False (and keeps the buffer) if the server is away."""
        if not force and time.monotonic() - self._last_flush < self.flush_every_s:
            return True
        self._last_flush = time.monotonic()
        try:
            self._ensure_run()
            self._send()
        except Exception as exc:  # any transport/server error: keep the data, keep training
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning(
                    "MLflow at %s unreachable (%s); buffering %d items and retrying",
                    _safe_uri(self.tracking_uri),
                    type(exc).__name__,
                    self.pending,
                )
            return False
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s is back after %.0f s; buffered data flushed",
                _safe_uri(self.tracking_uri),
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        return True

    def close(self, status: str = "FINISHED") -> None:
        if self.flush(force=True) and self.run_id:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:
                log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, exc)
        elif self.pending:
            self._spill()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    # -- internals -------------------------------------------------------------------------------
    def _stage(self, name: str) -> Path:
        """A fresh spool path that keeps the file's own name (MLflow names the artifact after it)."""
        staged_dir = self._spool / uuid.uuid4().hex[:8]
        staged_dir.mkdir(parents=True)
        return staged_dir / name

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = None
            if self.tracking_uri.startswith("sqlite:"):
                location = (self.run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        log.info(
            "MLflow run %s in experiment %r at %s", self.run_id, self.experiment, _safe_uri(self.tracking_uri)
        )

    def _send(self) -> None:
        # Params and tags are deduplicated by key (last wins), as MLflow refuses changed params.
        params = list({p.key: p for p in self._params}.values())
        tags = list({t.key: t for t in self._tags}.values())
        while params or tags or self._metrics:
            batch_params = params[: BATCH_LIMITS["params"]]
            batch_tags = tags[: BATCH_LIMITS["tags"]]
            batch_metrics = self._metrics[: BATCH_LIMITS["metrics"]]
            self.client.log_batch(self.run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)
            params = params[len(batch_params) :]
            tags = tags[len(batch_tags) :]
            self._params, self._tags = params, tags
            self._metrics = self._metrics[len(batch_metrics) :]
        while self._artifacts:
            path, artifact_path = self._artifacts[0]
            self.client.log_artifact(self.run_id, path, artifact_path)
            self._artifacts.pop(0)
            os.remove(path)

    def _spill(self) -> None:
        """Last resort at close: write what could not be sent where a person can find it."""
        target = self.run_dir / "tracking-unsent.jsonl"
        with open(target, "a") as handle:
            for metric in self._metrics:
                handle.write(
                    json.dumps({"metric": metric.key, "value": metric.value, "step": metric.step}) + "\n"
                )
            for param in self._params:
                handle.write(json.dumps({"param": param.key, "value": param.value}) + "\n")
            for path, artifact_path in self._artifacts:
                handle.write(json.dumps({"artifact": path, "artifact_path": artifact_path}) + "\n")
        log.warning("MLflow unreachable at close: %d items written to %s", self.pending, target)


def _artifact_dir(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def _safe_uri(uri: str) -> str:
    return redact_value("uri", uri)


def read_run(tracking_uri: str, run_id: str) -> Any:
    """A finished run as MLflow returns it (used by tests and the demo's summary)."""
    return MlflowClient(tracking_uri=tracking_uri).get_run(run_id)


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [item.path for item in MlflowClient(tracking_uri=tracking_uri).list_artifacts(run_id, path)]


__all__ = [
    "Tracker",
    "redact",
    "redact_value",
    "image_grid",
    "default_tracking_uri",
    "read_run",
    "list_artifacts",
]
