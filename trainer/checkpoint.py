"""Checkpoints that survive crashes: engine + loader + RNG state, published atomically.

Layout of one checkpoint at ``<root>/step-000000123/``::

    engine/...              DeepSpeed's save_checkpoint (module, optimizer, ZeRO partitions)
    rng/rank-00000.pt       torch / cuda / numpy / python RNG state of each rank
    trainer_state.json      step, every rank's loader state, eval metrics, config hash
    COMPLETE                written last, holds the same metadata

Every rank writes into a local staging folder first; the folder is then moved (local root) or
uploaded (``s3://`` root) into place, and only after every file is there does rank 0 write
``COMPLETE``. Readers ignore folders without it, so a crash mid-save leaves the previous checkpoint
as the newest loadable one. Old checkpoints are pruned to the last ``keep_last`` plus the best one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import storage

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
ENGINE_TAG = "engine"
STATE_FILE = "trainer_state.json"
PREFIX = "step-"


@dataclass
class CheckpointInfo:
    """A complete checkpoint, as its ``COMPLETE`` marker describes it."""

    url: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None  # the step the metrics were measured at
    config_hash: str = ""
    world_size: int = 1
    created: float = 0.0


def checkpoint_url(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:09d}")


def read_marker(url: str) -> CheckpointInfo | None:
    """The checkpoint at ``url`` if its ``COMPLETE`` marker exists, else None."""
    marker = storage.join(url, COMPLETE)
    if not storage.exists(marker):
        return None
    meta = json.loads(storage.read_bytes(marker))
    return CheckpointInfo(
        url=url,
        step=meta["step"],
        metrics=meta.get("metrics", {}),
        metrics_step=meta.get("metrics_step"),
        config_hash=meta.get("config_hash", ""),
        world_size=meta.get("world_size", 1),
        created=meta.get("created", 0.0),
    )


def _step_dirs(root: str) -> list[str]:
    return [url for url in storage.list_files(root) if url.rstrip("/").rsplit("/", 1)[-1].startswith(PREFIX)]


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first."""
    found = [info for url in _step_dirs(root) if (info := read_marker(url)) is not None]
    return sorted(found, key=lambda info: info.step)


def resolve_resume(resume: str, root: str) -> str | None:
    """``"never"`` -> None; ``"auto"`` -> the newest complete checkpoint (or None); else that URL."""
    if resume == "never":
        return None
    if resume == "auto":
        complete = list_checkpoints(root)
        return complete[-1].url if complete else None
    if read_marker(resume) is None:
        raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint there (no {COMPLETE} marker)")
    return resume


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _is_node_leader(url: str) -> bool:
    """Who moves files: rank 0 for a local (shared) root, each node's local rank 0 for object storage."""
    if storage.is_local(url):
        return _rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _scratch_dir(url: str, purpose: str) -> str:
    """A node-local folder for one checkpoint, the same on every rank of the node."""
    if storage.is_local(url):
        path = _local_path(url).rstrip("/")
        return os.path.join(os.path.dirname(path), f".{purpose}-{os.path.basename(path)}")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"tessera-ckpt-{purpose}-{digest}")


class Checkpointer:
    """Saves and restores an ``Engine`` (plus loader state) under one root URL."""

    def __init__(
        self,
        root: str,
        *,
        keep_last: int = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        config_hash: str = "",
    ) -> None:
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.config_hash = config_hash

    # -- save ------------------------------------------------------------------------------------
    def save(
        self,
        engine: Any,
        *,
        loader_state: Any = None,
        metrics: dict[str, float] | None = None,
        metrics_step: int | None = None,
    ) -> str:
        """Collective: every rank calls it. Returns the URL of the published checkpoint.

        ``metrics_step``: the step ``metrics`` were measured at (default: this one); keep-best ranks
        only checkpoints whose metrics are their own.
        """
        url = checkpoint_url(self.root, engine.step)
        if read_marker(url) is not None:
            return url  # this exact step is already saved whole; rewriting it would open a gap
        staging = _scratch_dir(url, "staging")
        if _is_node_leader(url):
            shutil.rmtree(staging, ignore_errors=True)
            if _rank() == 0:
                self._remove_incomplete()
        _barrier()
        engine.ds.save_checkpoint(
            staging, tag=ENGINE_TAG, client_state={"engine": engine.state_dict()}, save_latest=False
        )
        os.makedirs(os.path.join(staging, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(staging, "rng", f"rank-{_rank():05d}.pt"))
        loader_states = [None] * _world()
        if _world() > 1:
            dist.all_gather_object(loader_states, loader_state)
        else:
            loader_states = [loader_state]
        meta = {
            "step": engine.step,
            "metrics": metrics or {},
            "metrics_step": engine.step if metrics_step is None else metrics_step,
            "config_hash": self.config_hash,
            "world_size": _world(),
            "created": time.time(),
        }
        if _rank() == 0:
            with open(os.path.join(staging, STATE_FILE), "w") as handle:
                json.dump({**meta, "loader_states": loader_states}, handle)
        _barrier()
        if _is_node_leader(url):
            self._publish(staging, url)
        _barrier()
        if _rank() == 0:
            storage.write_bytes_atomic(storage.join(url, COMPLETE), json.dumps(meta).encode())
            log.info("checkpoint step %d published at %s", engine.step, url)
            self._prune()
        _barrier()
        return url

    def _publish(self, staging: str, url: str) -> None:
        if storage.is_local(url):
            target = _local_path(url)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            return
        fs, path = storage.filesystem(url)
        for folder, _, files in os.walk(staging):
            for name in files:
                local = os.path.join(folder, name)
                fs.put_file(local, f"{path}/{os.path.relpath(local, staging)}")
        shutil.rmtree(staging, ignore_errors=True)

    def _remove_incomplete(self) -> None:
        """Folders a crashed save left behind (no marker) go before a new save starts."""
        for url in _step_dirs(self.root):
            if read_marker(url) is None:
                log.warning("removing incomplete checkpoint %s (a save did not finish)", url)
                storage.remove(url, recursive=True)

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        keep = {info.url for info in complete[-self.keep_last :]}
        best = self.best()
        if best is not None:
            keep.add(best.url)
        for info in complete:
            if info.url not in keep:
                # The marker goes first, so a half-deleted folder is never mistaken for a checkpoint.
                storage.remove(storage.join(info.url, COMPLETE))
                storage.remove(info.url, recursive=True)

    def best(self) -> CheckpointInfo | None:
        """The complete checkpoint with the best ``best_metric`` (None without one)."""
        if not self.best_metric:
            return None
        scored = [
            info
            for info in list_checkpoints(self.root)
            if self.best_metric in info.metrics and info.metrics_step == info.step
        ]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored, key=lambda info: info.metrics[self.best_metric])

    # -- load ------------------------------------------------------------------------------------
    def load(self, engine: Any, url: str) -> dict[str, Any]:
        """Collective: restore ``engine`` and this rank's RNG from ``url``; returns trainer state
        (``step``, ``loader_states`` of every saving rank, ``metrics``, ``config_hash``)."""
        info = read_marker(url)
        if info is None:
            raise FileNotFoundError(f"{url}: not a complete checkpoint (no {COMPLETE} marker)")
        if info.world_size != _world():
            raise ValueError(
                f"{url} was saved by {info.world_size} ranks; this run has {_world()} "
                "(ZeRO partitions are per rank: resume with the same world size)"
            )
        if info.config_hash and self.config_hash and info.config_hash != self.config_hash:
            log.warning("resuming %s saved with a different config (hash %s)", url, info.config_hash[:12])
        local = _local_path(url)
        if not storage.is_local(url):
            local = _scratch_dir(url, "download")
            if _is_node_leader(url):
                shutil.rmtree(local, ignore_errors=True)
                fs, path = storage.filesystem(url)
                fs.get(path.rstrip("/") + "/", local, recursive=True)
        _barrier()
        _, client_state = engine.ds.load_checkpoint(local, tag=ENGINE_TAG, load_lr_scheduler_states=False)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state in {url}")
        engine.load_state_dict(client_state["engine"])
        set_rng_state(torch.load(os.path.join(local, "rng", f"rank-{_rank():05d}.pt"), weights_only=False))
        with open(os.path.join(local, STATE_FILE)) as handle:
            state = json.load(handle)
        _barrier()
        if not storage.is_local(url) and _is_node_leader(url):
            shutil.rmtree(local, ignore_errors=True)
        log.info("resumed from %s (step %d)", url, state["step"])
        return state
