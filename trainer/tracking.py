"""MLflow tracking that never blocks or takes down a training run.

The only module that imports mlflow (lazily: ``import trainer.tracking`` stays cheap). The training
thread only *enqueues*: a background sender thread owns every network call, with a per-request timeout,
no MLflow-internal retries and exponential backoff of its own. When the queue is full, or MLflow is still
away when the run closes, records go to ``<run dir>/tracking-unsent.jsonl`` (params, metrics, tags,
artifacts, model registrations and the run's final status). That file is replayed by the next Tracker
for the same run folder and by ``tessera tracking replay``, which finishes the run with its real status.
Everything is redacted (:mod:`trainer.redaction`) before it is queued, so neither MLflow nor the spill
file ever holds a credential.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.redaction import (
    REDACTED,
    install_log_redaction,
    redact,
    redact_command,
    redact_text,
    redact_value,
)

log = logging.getLogger(__name__)

UNSENT_FILE = "tracking-unsent.jsonl"
SPOOL_DIR = "tracking-spool"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_TAG_LENGTH = 8000
BATCH_LIMITS = {"metric": 1000, "param": 100, "tag": 100}  # MLflow's log_batch limits
BACKOFF_START_S = 0.5
LINEAGE_PACKAGES = ("torch", "deepspeed", "ray", "mlflow", "webdataset")
RUN_KEY_TAG = "tessera.run_key"  # finds a run again when replaying records spilled before its id was known

Record = dict[str, Any]  # one JSON-able tracking operation: {"kind": "metric"|"param"|..., ...}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the shape MLflow params want."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else one SQLite store per working directory: ``./runs/mlflow.db``.

    Every command (train, sample, eval, demo) lands in the same store, the one ``mlflow ui`` opens.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'runs' / 'mlflow.db'}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


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


# -- lineage -------------------------------------------------------------------------------------------
def lineage_tags() -> dict[str, str]:
    """Git commit of the code that runs, versions of the packages that matter, the (redacted) command."""
    tags = {"tessera.command": redact_command(sys.argv)}
    for package in LINEAGE_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"tessera.version.{package}"] = importlib.metadata.version(package)
    source = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            tags["mlflow.source.git.commit"] = head.stdout.strip()
    return tags


# -- MLflow calls (sender thread and replay only) ------------------------------------------------------
_request_env_lock = threading.Lock()
_request_env_users = 0
_request_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def _request_settings(timeout_s: float) -> Iterator[None]:
    """MLflow reads these from the environment on every request: set them only while we call MLflow.

    Timeout and retries keep a user's own values; the run-URL print is always off (the URL can carry
    ``user:password@``; we log a redacted link instead). Reference-counted: sender threads overlap.
    """
    global _request_env_users
    wanted = {  # name: (value, override a user's value)
        "MLFLOW_HTTP_REQUEST_TIMEOUT": (str(max(1, round(timeout_s))), False),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": ("0", False),  # our own backoff retries, off the training thread
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": ("true", True),
    }
    with _request_env_lock:
        if _request_env_users == 0:
            for name, (value, override) in wanted.items():
                _request_env_saved[name] = os.environ.get(name)
                if override or name not in os.environ:
                    os.environ[name] = value
        _request_env_users += 1
    try:
        yield
    finally:
        with _request_env_lock:
            _request_env_users -= 1
            if _request_env_users == 0:
                for name, value in _request_env_saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    install_log_redaction("mlflow")  # mlflow's own handler: its messages may quote the tracking URL
    path = _sqlite_path(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _retryable(exc: BaseException) -> bool:
    """Transport failures and server errors are retried; a request MLflow refuses (4xx) is not."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return True


def _open_run(client: Any, tracking_uri: str, header: Record, find_existing: bool) -> str:
    """The run described by a spill header (or a new Tracker): its id, creating experiment/run if needed."""
    from mlflow.exceptions import MlflowException

    if header.get("run_id"):
        try:
            return client.get_run(header["run_id"]).info.run_id
        except MlflowException as exc:
            if _retryable(exc):
                raise
    experiment = client.get_experiment_by_name(header["experiment"])
    if experiment is None:
        path = _sqlite_path(tracking_uri)
        location = (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None
        experiment_id = client.create_experiment(header["experiment"], artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    if find_existing:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{header['run_key']}'", max_results=1
        )
        if found:
            return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        start_time=header["start_time"],
        tags={RUN_KEY_TAG: header["run_key"]},
        run_name=header["run_name"],
    )
    return run.info.run_id


def _deliver(client: Any, run_id: str, records: list[Record]) -> None:
    """Send ``records`` in order, removing each from the list once MLflow has it.

    Raises on a retryable failure (the unsent rest stays in ``records``); a record MLflow refuses
    (e.g. a param whose value changed) is dropped with a warning, so one bad value cannot block the rest.
    """
    while records:
        if records[0]["kind"] in BATCH_LIMITS:
            count, used = 0, dict.fromkeys(BATCH_LIMITS, 0)
            for record in records:
                kind = record["kind"]
                if kind not in BATCH_LIMITS or used[kind] == BATCH_LIMITS[kind]:
                    break
                used[kind] += 1
                count += 1
            _log_batch(client, run_id, records[:count])
            del records[:count]
        else:
            _apply(client, run_id, records[0])
            del records[0]


def _log_batch(client: Any, run_id: str, batch: list[Record]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    metrics = [
        Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in batch if r["kind"] == "metric"
    ]
    # Last value wins within a batch: MLflow refuses a batch that repeats a key.
    params = {r["key"]: Param(r["key"], r["value"]) for r in batch if r["kind"] == "param"}
    tags = {r["key"]: RunTag(r["key"], r["value"]) for r in batch if r["kind"] == "tag"}
    try:
        client.log_batch(run_id, metrics=metrics, params=list(params.values()), tags=list(tags.values()))
    except Exception as exc:
        if _retryable(exc):
            raise
        if len(batch) == 1:
            log.warning("MLflow refused %s %r: %s", batch[0]["kind"], batch[0]["key"], redact_text(str(exc)))
            return
        for record in batch:  # find the one MLflow refuses; keep the others
            _log_batch(client, run_id, [record])


def _apply(client: Any, run_id: str, record: Record) -> None:
    kind = record["kind"]
    if kind == "artifact":
        staged = Path(record["path"])
        if not staged.exists():
            log.warning("artifact %s vanished before upload; skipped", staged)
            return
        client.log_artifact(run_id, str(staged), record["artifact_path"])
        shutil.rmtree(staged.parent, ignore_errors=True)
    elif kind == "register":
        _register(client, run_id, record["name"], record["artifact_path"])
    elif kind == "status":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def _register(client: Any, run_id: str, name: str, artifact_path: str) -> None:
    """A Model Registry version for ``artifact_path`` of the run (once, even when replayed twice)."""
    from mlflow.exceptions import MlflowException

    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if any(version.source == source for version in existing):
        return
    version = client.create_model_version(name, source, run_id=run_id)
    log.info("registered model %r version %s from run %s", name, version.version, run_id)


# -- the spill file ------------------------------------------------------------------------------------
def _write_unsent(run_dir: Path, header: Record, records: list[Record]) -> None:
    """Append ``records`` (with the header that says which run they belong to) to the spill file."""
    if not records:
        return
    key = header["run_key"]
    with open(run_dir / UNSENT_FILE, "a") as handle:
        handle.write(json.dumps({**header, "kind": "run"}) + "\n")
        handle.writelines(json.dumps({**record, "run_key": key}) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())


def _read_unsent(path: Path) -> dict[str, tuple[Record, list[Record]]]:
    """Spill lines grouped by run: ``{run_key: (header, records)}``; a torn last line is skipped."""
    runs: dict[str, tuple[Record, list[Record]]] = {}
    skipped = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            key, kind = record.pop("run_key"), record["kind"]
        except (ValueError, KeyError, AttributeError):
            skipped += 1
            continue
        if kind == "run":
            header, records = runs.get(key, ({}, []))
            # A later header may know the run id an earlier one did not.
            known = {name: value for name, value in record.items() if value is not None}
            runs[key] = ({**header, **known, "run_key": key}, records)
        elif key in runs:
            runs[key][1].append(record)
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d unreadable lines", path, skipped)
    return runs


def _replay_file(client: Any, tracking_uri: str, run_dir: Path, lock: threading.Lock) -> dict[str, int]:
    """Send what an earlier outage left in ``run_dir``'s spill file; what still fails goes back into it."""
    spill = run_dir / UNSENT_FILE
    claimed = run_dir / f"tracking-unsent.replaying-{uuid.uuid4().hex[:8]}.jsonl"
    with lock:
        if not spill.exists():
            return {"runs": 0, "records": 0, "left": 0}
        os.replace(spill, claimed)  # new spills during the replay start a fresh file
    sent = left = 0
    runs = _read_unsent(claimed)
    for header, records in runs.values():
        total = len(records)
        try:
            run_id = _open_run(client, tracking_uri, header, find_existing=True)
            header["run_id"] = run_id
            _deliver(client, run_id, records)
        except Exception as exc:
            log.warning("replay of run %s stopped: %s", header.get("run_name"), redact_text(str(exc)))
            with lock:
                _write_unsent(run_dir, header, records)
        sent += total - len(records)
        left += len(records)
    claimed.unlink()
    if runs:
        log.info("replayed %d tracking records of %d runs from %s (%d left)", sent, len(runs), spill, left)
    return {"runs": len(runs), "records": sent, "left": left}


def replay_unsent(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, int]:
    """``tessera tracking replay``: send a run folder's spill file now; counts of runs/records sent/left."""
    tracking_uri = tracking_uri or default_tracking_uri()
    with _request_settings(timeout_s=30):
        return _replay_file(_client(tracking_uri), tracking_uri, Path(run_dir), threading.Lock())


# -- the tracker ---------------------------------------------------------------------------------------
class Tracker:
    """One MLflow run: params, metrics by step, artifacts, image grids and models, sent in the background.

    ``run_name`` gets a short unique suffix (reruns never collide); the plain name is the
    ``tessera.run_name`` tag. ``queue_size`` bounds memory during an outage (the overflow is spilled),
    ``request_timeout_s`` bounds each MLflow request, ``close_timeout_s`` bounds how long ``close``
    waits for the sender before spilling what is left.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        *,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        queue_size: int = 10_000,
        request_timeout_s: float = 10.0,
        close_timeout_s: float = 60.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = redact_text(experiment)
        base_name = redact_text(run_name or experiment)
        self.run_name = f"{base_name}-{uuid.uuid4().hex[:6]}"
        self.request_timeout_s = request_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_backoff_s = max_backoff_s
        self._header: Record = {
            "run_key": uuid.uuid4().hex,
            "experiment": self.experiment,
            "run_name": self.run_name,
            "run_id": None,
            "start_time": _now_ms(),
        }
        self._queue: queue.Queue[list[Record]] = queue.Queue(maxsize=queue_size)
        self._pending: list[Record] = []  # taken from the queue by the sender, not yet delivered
        self._pending_items = 0
        self._lock = threading.Lock()  # the spill file and the hand-over between sender and close
        self._settled = threading.Condition()
        self._enqueued = self._done = 0
        self._closing = threading.Event()
        self._first_attempt = threading.Event()
        self._abandoned = self._closed = False
        self._outage_since: float | None = None
        self.set_tags({**lineage_tags(), "tessera.run_name": base_name, **(tags or {})})
        self._sender = threading.Thread(target=self._send_loop, name="tessera-tracking", daemon=True)
        self._sender.start()

    # -- public API (training thread: builds records and enqueues, never touches the network) --------
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while MLflow is unreachable. Waits for the sender's first attempt."""
        self._first_attempt.wait(self.close_timeout_s)
        return self._header["run_id"]

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._enqueue(
            [
                {"kind": "param", "key": key, "value": str(redact_value(key, value))[:MAX_PARAM_LENGTH]}
                for key, value in flatten(params).items()
            ]
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._enqueue(
            [
                {"kind": "tag", "key": key, "value": str(redact_value(key, value))[:MAX_TAG_LENGTH]}
                for key, value in tags.items()
            ]
        )

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        now = _now_ms()
        self._enqueue(
            [
                {"kind": "metric", "key": key, "value": float(value), "step": int(step), "timestamp": now}
                for key, value in metrics.items()
                if value is not None
            ]
        )

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy the file into the spool first, so a later outage or cleanup cannot lose it."""
        staged = self._stage(Path(local_path).name)
        shutil.copyfile(local_path, staged)
        self._enqueue_artifact(staged, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        staged = self._stage(Path(artifact_file).name)
        staged.write_text(redact_text(text))
        self._enqueue_artifact(staged, _artifact_dir(artifact_file))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str), artifact_file)

    def log_image_grid(self, images: torch.Tensor, artifact_file: str, nrow: int = 8) -> None:
        staged = self._stage(Path(artifact_file).name)
        Image.fromarray(image_grid(images, nrow=nrow)).save(staged)
        self._enqueue_artifact(staged, _artifact_dir(artifact_file))

    def log_model_file(
        self,
        path: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        artifact_path: str = "model",
        register_as: str | None = None,
    ) -> None:
        """The trained model (one consolidated file) and its config under ``artifact_path``; optionally
        registered in the Model Registry as ``register_as``."""
        self.log_artifact(path, artifact_path)
        self.log_dict(config, f"{artifact_path}/config.json")
        if register_as:
            self.register_model(register_as, artifact_path)

    def register_model(self, name: str, artifact_path: str = "model") -> None:
        """A new version of registered model ``name`` from this run's ``artifact_path`` (after it uploads)."""
        self._enqueue([{"kind": "register", "name": name, "artifact_path": artifact_path}])

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is delivered or spilled (tests, end of a stage)."""
        with self._settled:
            target = self._enqueued
            return self._settled.wait_for(lambda: self._done >= target, timeout)

    def close(self, status: str = "FINISHED") -> None:
        """Finish the run with ``status``; what cannot be sent within ``close_timeout_s`` is spilled."""
        if self._closed:
            return
        self._closed = True
        self._enqueue([{"kind": "status", "status": status, "end_time": _now_ms()}])
        self._closing.set()
        self._sender.join(self.close_timeout_s)
        if self._sender.is_alive():  # stuck in a request to a server that does not answer
            with self._lock:
                self._abandoned = True
                left = self._pending + self._drain()
                _write_unsent(self.run_dir, self._header, left)
            self._settle()
            if left:
                log.warning(
                    "MLflow did not answer within %.0f s at close: %d records written to %s",
                    self.close_timeout_s,
                    len(left),
                    self.run_dir / UNSENT_FILE,
                )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    # -- internals -----------------------------------------------------------------------------------
    def _stage(self, name: str) -> Path:
        """A fresh spool path that keeps the file's own name (MLflow names the artifact after it)."""
        staged_dir = self.run_dir / SPOOL_DIR / uuid.uuid4().hex[:8]
        staged_dir.mkdir(parents=True)
        return staged_dir / name

    def _enqueue_artifact(self, staged: Path, artifact_path: str | None) -> None:
        self._enqueue([{"kind": "artifact", "path": str(staged), "artifact_path": artifact_path}])

    def _enqueue(self, records: list[Record]) -> None:
        """The training thread's only tracking work; a full queue spills to disk instead of waiting."""
        if not records:
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            with self._lock:
                _write_unsent(self.run_dir, self._header, records)
            return
        with self._settled:
            self._enqueued += 1

    def _drain(self) -> list[Record]:
        """Everything still queued (at close); counted as taken so ``flush`` does not wait for it."""
        records: list[Record] = []
        with contextlib.suppress(queue.Empty):
            while True:
                records.extend(self._queue.get_nowait())
                self._pending_items += 1
        return records

    def _take(self) -> bool:
        """Move queued records into ``_pending`` (blocking while idle); False once closed and empty."""
        if not self._pending:
            if self._closing.is_set() and self._queue.empty():
                return False
            self._pending.extend(self._queue.get())
            self._pending_items = 1
        with contextlib.suppress(queue.Empty):
            while len(self._pending) < BATCH_LIMITS["metric"]:
                self._pending.extend(self._queue.get_nowait())
                self._pending_items += 1
        return True

    def _settle(self) -> None:
        with self._settled:
            self._done += self._pending_items
            self._pending_items = 0
            self._settled.notify_all()

    def _send_loop(self) -> None:
        client = None
        backoff = BACKOFF_START_S
        while self._take():
            try:
                with _request_settings(self.request_timeout_s):
                    client = client or _client(self.tracking_uri)
                    if self._header["run_id"] is None:
                        self._header["run_id"] = _open_run(client, self.tracking_uri, self._header, False)
                        self._first_attempt.set()
                        log.info("MLflow run %s at %s", self.run_name, self._uri())
                        _replay_file(client, self.tracking_uri, self.run_dir, self._lock)
                    _deliver(client, self._header["run_id"], self._pending)
            except Exception as exc:
                self._first_attempt.set()
                if self._stop_after_failure(exc):
                    return
                self._closing.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            if self._outage_since is not None:
                away = time.monotonic() - self._outage_since
                log.warning("MLflow at %s is back after %.0f s", self._uri(), away)
                self._outage_since = None
            backoff = BACKOFF_START_S
            self._settle()
        if client is not None:
            self._finish_healthy(client)

    def _stop_after_failure(self, exc: Exception) -> bool:
        """Warn once per outage; at close, spill everything unsent and tell the loop to stop."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "MLflow at %s unreachable (%s); training continues, records queue up and are retried",
                self._uri(),
                redact_text(str(exc))[:300],
            )
        if not self._closing.is_set():
            return False
        with self._lock:
            if not self._abandoned:
                left = self._pending + self._drain()
                _write_unsent(self.run_dir, self._header, left)
                log.warning(
                    "MLflow unreachable at close: %d records written to %s; `tessera tracking replay "
                    "--run-dir %s` (or the next run in this folder) sends them",
                    len(left),
                    self.run_dir / UNSENT_FILE,
                    self.run_dir,
                )
        self._pending.clear()
        self._settle()
        return True

    def _finish_healthy(self, client: Any) -> None:
        """Closed with MLflow reachable: send what overflowed into the spill file, say where the run is."""
        with self._lock:
            if self._abandoned:
                return
        try:
            with _request_settings(self.request_timeout_s):
                _replay_file(client, self.tracking_uri, self.run_dir, self._lock)
        except OSError as exc:
            log.warning("could not replay %s: %s", self.run_dir / UNSENT_FILE, exc)
        with contextlib.suppress(OSError):  # every staged file was uploaded (or the spill file names it)
            (self.run_dir / SPOOL_DIR).rmdir()
        log.info("MLflow run %s finished: %s", self.run_name, self._uri())

    def _uri(self) -> str:
        return redact_text(self.tracking_uri)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifact_dir(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def read_run(tracking_uri: str, run_id: str) -> Any:
    """A finished run as MLflow returns it (used by tests and the demo's summary)."""
    return _client(tracking_uri).get_run(run_id)


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [item.path for item in _client(tracking_uri).list_artifacts(run_id, path)]


def find_finished_runs(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> list[str]:
    """Ids of FINISHED runs of ``experiment`` carrying every tag in ``tags``, newest first (none: [])."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    query = " and ".join([*clauses, "attributes.status = 'FINISHED'"])
    runs = client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"])
    return [run.info.run_id for run in runs]


__all__ = [
    "REDACTED",
    "Tracker",
    "default_tracking_uri",
    "find_finished_runs",
    "flatten",
    "image_grid",
    "lineage_tags",
    "list_artifacts",
    "read_run",
    "redact",
    "redact_value",
    "replay_unsent",
]
