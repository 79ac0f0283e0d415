"""Checkpoints: the one owner of their format. Save, verify, resume, read weights back, export.

Layout of one checkpoint at ``<root>/step-000000123/``::

    latest                  "engine": lets DeepSpeed's own zero_to_fp32.py find the tag
    engine/...              DeepSpeed's save_checkpoint: module, optimizer / ZeRO partitions,
                            MoE expert files (layer_*_expert_*_mp_rank_*_model_states.pt)
    rng/rank-00000.json     torch / cuda / numpy / python RNG state of each rank, as JSON
    model.json              the model's config (every ``trainer.models`` model carries one)
    trainer_state.json      step, every rank's loader state, eval metrics, config hash
    COMPLETE                written last: the same metadata plus the sha256 of every file above

Guarantees:

- **Atomic publish.** Ranks write into a staging folder; every file is fsynced, the folder is moved
  (local root) or uploaded (``s3://``) into place, and only then does rank 0 write ``COMPLETE``.
  Readers ignore folders without it, so a crash mid-save leaves the previous checkpoint newest.
- **Nothing is deserialised before it is verified.** Every file's sha256 is checked against the list in
  ``COMPLETE`` first; a mismatch or a missing file is a :class:`CheckpointError` naming the file.
- **Nothing from storage is unpickled.** State of our own is JSON; tensors (ours and DeepSpeed's, whose
  loads are routed through :class:`_SafeLoads`) are read with ``torch.load(weights_only=True)``, with
  only DeepSpeed's plain data classes (an enum, its loss scalers, a fragment address) allowlisted.
- **resume="auto" survives a damaged newest checkpoint**: it falls back to the newest one that verifies
  and loads, says so, renames the damaged one's marker to ``DAMAGED`` and a later save of that step
  replaces it.

Weights can be read back for any layout (ZeRO-0..3, MoE experts; the fp32 master copy where the
optimizer holds one) by :func:`read_module_state`, and exported without DeepSpeed or pickle as
safetensors plus the config JSON by :func:`export_model`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel

from data_pipeline import storage

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
DAMAGED = "DAMAGED"
ENGINE_TAG = "engine"
STATE_FILE = "trainer_state.json"
MODEL_CONFIG_FILE = "model.json"
PREFIX = "step-"
MAIN_MODEL_FILE = f"{ENGINE_TAG}/mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(rf"{ENGINE_TAG}/layer_\d+_expert_\d+_mp_rank_\d+_model_states\.pt")
OPTIM_SUFFIX = "_optim_states.pt"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: a file is missing, damaged, or not plain tensors."""


@dataclass
class CheckpointInfo:
    """A complete checkpoint, as its ``COMPLETE`` marker describes it."""

    url: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    config_hash: str = ""
    world_size: int = 1
    created: float = 0.0
    metrics_step: int | None = None  # the step ``metrics`` were measured at (None: not recorded)
    files: dict[str, str] = field(default_factory=dict)  # path inside the checkpoint -> sha256


def checkpoint_url(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:09d}")


def read_marker(url: str) -> CheckpointInfo | None:
    """The checkpoint at ``url`` if its ``COMPLETE`` marker exists, else None."""
    marker = storage.join(url, COMPLETE)
    if not storage.exists(marker):
        return None
    try:
        meta = json.loads(storage.read_bytes(marker))
        return CheckpointInfo(
            url=url,
            step=int(meta["step"]),
            metrics=meta.get("metrics", {}),
            config_hash=meta.get("config_hash", ""),
            world_size=meta.get("world_size", 1),
            created=meta.get("created", 0.0),
            metrics_step=meta.get("metrics_step"),
            files=dict(meta.get("files", {})),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable marker ({exc})") from exc


def _is_readable(url: str) -> bool:
    try:
        return read_marker(url) is not None
    except CheckpointError:
        return False  # an unreadable marker: the folder is replaced like a damaged one


def _step_dirs(root: str) -> list[str]:
    return [url for url in storage.list_files(root) if url.rstrip("/").rsplit("/", 1)[-1].startswith(PREFIX)]


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first (an unreadable marker counts as absent)."""
    found = []
    for url in _step_dirs(root):
        try:
            info = read_marker(url)
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", url, exc)
            continue
        if info is not None:
            found.append(info)
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


# -- integrity: sha256 of every file, fsync before the marker ---------------------------------------
def _sha256_and_sync(path: str) -> str:
    """The file's sha256; it is fsynced on the way, so the marker never outlives its data in a crash."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def digest_folder(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``; files and folders are fsynced."""
    digests = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            digests[os.path.relpath(path, folder).replace(os.sep, "/")] = _sha256_and_sync(path)
        _fsync_dir(parent)
    return digests


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(info: CheckpointInfo, name: str, local_path: str) -> None:
    """Raise :class:`CheckpointError` unless ``local_path`` is the file ``name`` the marker lists."""
    expected = info.files.get(name)
    where = storage.join(info.url, name)
    if expected is None:
        raise CheckpointError(f"{where}: not on the checkpoint's sha256 list; refusing to read it")
    if not os.path.isfile(local_path):
        raise CheckpointError(f"{where}: missing (the checkpoint lists it)")
    actual = _sha256_file(local_path)
    if actual != expected:
        raise CheckpointError(
            f"{where}: sha256 {actual[:16]}... does not match the checkpoint's {expected[:16]}...: "
            "the file is damaged or was replaced"
        )


def _require_sha_list(info: CheckpointInfo) -> None:
    if not info.files:
        raise CheckpointError(
            f"{info.url}: its {COMPLETE} marker has no sha256 list (written by an older Tessera): "
            "it cannot be verified, so it is not loaded"
        )


# -- safe deserialisation ----------------------------------------------------------------------------
@functools.cache
def _deepspeed_data_classes() -> tuple[type, ...]:
    """Plain data classes DeepSpeed pickles into its optimizer files (no code runs to rebuild them)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def safe_load(source: Any, map_location: Any = "cpu", *, name: str = "") -> Any:
    """``torch.load(weights_only=True)``: tensors and containers only, never arbitrary pickled code."""
    try:
        with torch.serialization.safe_globals(list(_deepspeed_data_classes())):
            return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign globals; anything else for a malformed file
        raise CheckpointError(
            f"{name or source}: refused: not a plain tensor file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


class _SafeLoads:
    """Stands in for a DeepSpeed engine's ``checkpoint_engine`` while it loads: every file DeepSpeed
    reads must be on the verified list and is read by :func:`safe_load` (DeepSpeed's own engine calls
    ``torch.load(weights_only=False)``)."""

    def __init__(self, inner: Any, verified: Mapping[str, str]) -> None:
        self._inner = inner
        self._verified = verified  # real local path -> name inside the checkpoint

    def load(self, path: str, map_location: Any = None) -> Any:
        name = self._verified.get(os.path.realpath(path))
        if name is None:
            raise CheckpointError(f"{path}: DeepSpeed asked for a file not on the checkpoint's sha256 list")
        return safe_load(path, map_location, name=name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._inner, attribute)


@contextmanager
def _safe_deepspeed_loads(ds: Any, verified: Mapping[str, str]) -> Iterator[None]:
    original = ds.checkpoint_engine
    ds.checkpoint_engine = _SafeLoads(original, verified)
    try:
        yield
    finally:
        ds.checkpoint_engine = original


@contextmanager
def _forced_weights_only() -> Iterator[None]:
    """DeepSpeed's zero_to_fp32 hard-codes ``torch.load(weights_only=False)``; torch's documented
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` override makes every load in this block weights-only."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(_deepspeed_data_classes())):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


# -- RNG state as JSON --------------------------------------------------------------------------------
def _bytes_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG a rank draws from, as JSON-ready data."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": _bytes_to_text(torch.get_rng_state()),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(words), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


# -- ranks ---------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (rank order), on every rank."""
    if _world() == 1:
        return [value]
    values: list[Any] = [None] * _world()
    dist.all_gather_object(values, value)
    return values


def _first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank, so all ranks take the same branch (else collectives hang)."""
    return next((e for e in _gather(error) if e), None)


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


def _model_config(module: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else None


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

        ``metrics_step``: the step ``metrics`` were measured at; :meth:`best` ranks only checkpoints
        whose metrics are their own."""
        url = checkpoint_url(self.root, engine.step)
        if _is_readable(url):
            return url  # this exact step is already saved whole; rewriting it would open a gap
        staging = _scratch_dir(url, "staging")
        if _is_node_leader(url):
            shutil.rmtree(staging, ignore_errors=True)
            if _rank() == 0:
                self._remove_incomplete(replacing=url)
        _barrier()
        engine.ds.save_checkpoint(
            staging, tag=ENGINE_TAG, client_state={"engine": engine.state_dict()}, save_latest=True
        )
        os.makedirs(os.path.join(staging, "rng"), exist_ok=True)
        with open(os.path.join(staging, "rng", f"rank-{_rank():05d}.json"), "w") as handle:
            json.dump(rng_state(), handle)
        loader_states = _gather(loader_state)
        meta = {
            "step": engine.step,
            "metrics": metrics or {},
            "metrics_step": metrics_step,
            "config_hash": self.config_hash,
            "world_size": _world(),
            "created": time.time(),
        }
        if _rank() == 0:
            with open(os.path.join(staging, STATE_FILE), "w") as handle:
                json.dump({**meta, "loader_states": loader_states}, handle)
            model_config = _model_config(engine.module)
            if model_config is not None:
                with open(os.path.join(staging, MODEL_CONFIG_FILE), "w") as handle:
                    json.dump(model_config, handle, indent=2)
        _barrier()
        files: dict[str, str] = {}
        for digests in _gather(digest_folder(staging) if _is_node_leader(url) else {}):
            files.update(digests)
        if _is_node_leader(url):
            self._publish(staging, url)
        _barrier()
        if _rank() == 0:
            marker = json.dumps({**meta, "files": files}).encode()
            storage.write_bytes_atomic(storage.join(url, COMPLETE), marker)
            if storage.is_local(url):
                _fsync_dir(_local_path(url))
            log.info("checkpoint step %d published at %s (%d files)", engine.step, url, len(files))
            self._prune()
        _barrier()
        return url

    def _publish(self, staging: str, url: str) -> None:
        if storage.is_local(url):
            target = _local_path(url)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            _fsync_dir(os.path.dirname(target))
            return
        for folder, _, files in os.walk(staging):
            for name in files:
                local = os.path.join(folder, name)
                storage.publish_file(local, storage.join(url, os.path.relpath(local, staging)))
        shutil.rmtree(staging, ignore_errors=True)

    def _remove_incomplete(self, replacing: str) -> None:
        """What crashed saves left behind goes before a new save starts: step folders without a marker
        and (local roots) other steps' staging folders. DAMAGED folders stay for inspection until a save
        of their step (``replacing``) replaces them."""
        step_name = replacing.rstrip("/").rsplit("/", 1)[-1]
        for url in storage.list_files(self.root):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if name == step_name:
                storage.remove(url, recursive=True)
            elif name.startswith(PREFIX) and not storage.exists(storage.join(url, COMPLETE)):
                if not storage.exists(storage.join(url, DAMAGED)):
                    log.warning("removing incomplete checkpoint %s (a save did not finish)", url)
                    storage.remove(url, recursive=True)
            elif name.startswith(".staging-") and name != f".staging-{step_name}":
                log.warning("removing %s (staging of a save that did not finish)", url)
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
        """The complete checkpoint with the best ``best_metric`` measured on its own weights (or None)."""
        if not self.best_metric:
            return None
        scored = [
            info
            for info in list_checkpoints(self.root)
            if self.best_metric in info.metrics and info.metrics_step in (None, info.step)
        ]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored, key=lambda info: info.metrics[self.best_metric])

    # -- load ------------------------------------------------------------------------------------
    def resume(self, engine: Any, resume: str) -> dict[str, Any] | None:
        """Collective. ``"never"``: None. A URL: load exactly that one. ``"auto"``: the newest checkpoint
        under the root that verifies and loads; damaged newer ones are logged and marked ``DAMAGED``.
        Returns :meth:`load`'s state plus ``url`` and ``skipped`` (the damaged URLs), or None."""
        if resume == "never":
            return None
        if resume != "auto":
            return {**self.load(engine, resume), "url": resume, "skipped": []}
        skipped: list[str] = []
        for info in reversed(list_checkpoints(self.root)):
            try:
                state = self.load(engine, info.url)
            except CheckpointError as exc:
                log.warning("resume=auto: %s cannot be used (%s); trying the one before it", info.url, exc)
                skipped.append(info.url)
                if _rank() == 0:
                    self._mark_damaged(info, str(exc))
                _barrier()
                continue
            if skipped:
                log.warning(
                    "resume=auto: resumed from %s (step %d), older than the damaged %s; "
                    "the next save of each damaged step replaces it",
                    info.url,
                    info.step,
                    ", ".join(skipped),
                )
            return {**state, "url": info.url, "skipped": skipped}
        if skipped:
            raise CheckpointError(f"resume=auto: no checkpoint under {self.root} verifies and loads")
        return None

    @staticmethod
    def _mark_damaged(info: CheckpointInfo, reason: str) -> None:
        """``COMPLETE`` -> ``DAMAGED`` (with the reason): readers skip it, a save of its step replaces it."""
        record = {"step": info.step, "reason": reason, "marked": time.time()}
        storage.write_bytes_atomic(storage.join(info.url, DAMAGED), json.dumps(record).encode())
        storage.remove(storage.join(info.url, COMPLETE))

    def load(self, engine: Any, url: str) -> dict[str, Any]:
        """Collective: restore ``engine`` and this rank's RNG from ``url``; returns trainer state
        (``step``, ``loader_states`` of every saving rank, ``metrics``, ``config_hash``).

        Every file is checked against the marker's sha256 list before anything is deserialised."""
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
        try:
            return self._load_verified(engine, info, local)
        finally:
            _barrier()
            if not storage.is_local(url) and _is_node_leader(url):
                shutil.rmtree(local, ignore_errors=True)

    def _load_verified(self, engine: Any, info: CheckpointInfo, local: str) -> dict[str, Any]:
        error = None
        if _is_node_leader(info.url):
            try:
                _require_sha_list(info)
                if not storage.is_local(info.url):
                    shutil.rmtree(local, ignore_errors=True)
                    storage.download_tree(info.url, local)
                for name in info.files:
                    verify_file(info, name, os.path.join(local, name))
            except CheckpointError as exc:
                error = str(exc)
        if error := _first_error(error):
            raise CheckpointError(error)
        verified = {os.path.realpath(os.path.join(local, name)): name for name in info.files}
        try:
            with _safe_deepspeed_loads(engine.ds, verified):
                _, client_state = engine.ds.load_checkpoint(
                    local, tag=ENGINE_TAG, load_lr_scheduler_states=False
                )
            if client_state is None:
                raise CheckpointError(f"{info.url}: DeepSpeed found no engine state in it")
            rng = _read_json(info, local, f"rng/rank-{_rank():05d}.json")
            state = _read_json(info, local, STATE_FILE)
        except CheckpointError as exc:
            error = str(exc)
        if error := _first_error(error):
            raise CheckpointError(error)
        engine.load_state_dict(client_state["engine"])
        set_rng_state(rng)
        log.info("resumed from %s (step %d)", info.url, state["step"])
        return state


def _read_json(info: CheckpointInfo, local: str, name: str) -> Any:
    try:
        with open(os.path.join(local, name)) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{storage.join(info.url, name)}: unreadable ({exc})") from exc


# -- weights for inference and export ---------------------------------------------------------------
def _complete(url: str) -> CheckpointInfo:
    info = read_marker(url)
    if info is None:
        raise FileNotFoundError(f"{url}: not a complete checkpoint (no {COMPLETE} marker)")
    _require_sha_list(info)
    return info


@contextmanager
def _verified_copy(info: CheckpointInfo, names: list[str]) -> Iterator[str]:
    """A local folder holding ``names`` of the checkpoint, each verified against its sha256."""
    if storage.is_local(info.url):
        folder = _local_path(info.url)
        for name in names:
            verify_file(info, name, os.path.join(folder, name))
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="tessera-ckpt-read-") as folder:
        for name in names:
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(storage.read_bytes(storage.join(info.url, name)))
            verify_file(info, name, path)
        yield folder


def read_model_config(url: str) -> dict[str, Any]:
    """The model config a checkpoint was saved with (``model.json``), verified."""
    info = _complete(url)
    if MODEL_CONFIG_FILE not in info.files:
        raise CheckpointError(f"{url}: has no {MODEL_CONFIG_FILE} (its model carries no config)")
    with (
        _verified_copy(info, [MODEL_CONFIG_FILE]) as folder,
        open(os.path.join(folder, MODEL_CONFIG_FILE)) as handle,
    ):
        return json.load(handle)


def read_module_state(url: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (local or object storage), whatever its layout.

    - MoE: the main module file plus every expert file (experts keyed by their global index, the
      layout of the same model built with ``ep_size=1``).
    - ZeRO-1/2/3 (and bf16 runs): the fp32 master copy the optimizer holds, reassembled from the
      per-rank partitions by DeepSpeed's ``zero_to_fp32`` (forced to load weights-only).
    - ZeRO-0 fp32: the module file, which is the master copy.
    """
    info = _complete(url)
    engine_files = sorted(name for name in info.files if name.startswith(f"{ENGINE_TAG}/"))
    experts = [name for name in engine_files if EXPERT_FILE.fullmatch(name)]
    partitions = [name for name in engine_files if name.endswith(OPTIM_SUFFIX)]
    if experts:
        with _verified_copy(info, [MAIN_MODEL_FILE, *experts]) as folder:
            state = safe_load(os.path.join(folder, MAIN_MODEL_FILE), name=MAIN_MODEL_FILE)["module"]
            for name in experts:
                state.update(safe_load(os.path.join(folder, name), name=name))
            return state
    if partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints progress to stdout, which CLI commands keep for their JSON result.
        with _verified_copy(info, engine_files) as folder, _forced_weights_only():
            try:
                with redirect_stdout(sys.stderr):
                    return dict(get_fp32_state_dict_from_zero_checkpoint(folder, tag=ENGINE_TAG))
            except Exception as exc:
                raise CheckpointError(f"{url}: refused or unreadable ZeRO partitions ({exc})") from exc
    if MAIN_MODEL_FILE not in info.files:
        raise CheckpointError(f"{url}: no DeepSpeed model states under {ENGINE_TAG}/")
    with _verified_copy(info, [MAIN_MODEL_FILE]) as folder:
        return safe_load(os.path.join(folder, MAIN_MODEL_FILE), name=MAIN_MODEL_FILE)["module"]


def save_weights(
    root: str, module: torch.nn.Module, *, step: int = 0, source: dict[str, Any] | None = None
) -> str:
    """A checkpoint of ``module``'s weights and config alone, made outside training (e.g. imported).

    Same layout and guarantees as :meth:`Checkpointer.save` (sha256 list, atomic publish, ``COMPLETE``
    last), so :func:`read_module_state`, :func:`read_model_config` and :func:`export_model` read it; it
    holds no optimizer or loader state, so it cannot be resumed. ``source`` goes into trainer_state.json.
    """
    url = checkpoint_url(root.rstrip("/"), step)
    staging = _scratch_dir(url, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, ENGINE_TAG))
    state = {name: value.detach().cpu().contiguous() for name, value in module.state_dict().items()}
    torch.save({"module": state}, os.path.join(staging, MAIN_MODEL_FILE))
    meta = {
        "step": step,
        "metrics": {},
        "metrics_step": None,
        "config_hash": "",
        "world_size": 1,
        "created": time.time(),
    }
    with open(os.path.join(staging, STATE_FILE), "w") as handle:
        json.dump({**meta, "loader_states": [], "source": source or {}}, handle)
    model_config = _model_config(module)
    if model_config is not None:
        with open(os.path.join(staging, MODEL_CONFIG_FILE), "w") as handle:
            json.dump(model_config, handle, indent=2)
    files = digest_folder(staging)
    if storage.exists(storage.join(url, COMPLETE)):
        storage.remove(storage.join(url, COMPLETE))  # the marker goes first: never a mixed checkpoint
    Checkpointer(root)._publish(staging, url)
    storage.write_bytes_atomic(storage.join(url, COMPLETE), json.dumps({**meta, "files": files}).encode())
    return url


def exported_config_path(out: str) -> str:
    """Where :func:`export_model` puts the config JSON: ``x.safetensors`` -> ``x.json``."""
    return out.removesuffix(".safetensors") + ".json"


def export_model(url: str, out: str, dtype: str = "fp32") -> dict[str, Any]:
    """One safetensors file with the checkpoint's weights in ``dtype`` plus its model config JSON beside
    it: loadable with ``safetensors.torch.load_file`` alone (no DeepSpeed, no pickle)."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(EXPORT_DTYPES)}")
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out!r}: name the file *.safetensors (the config goes beside it as *.json)")
    info = _complete(url)
    state = read_module_state(url)
    tensors = {
        name: (value.to(EXPORT_DTYPES[dtype]) if value.is_floating_point() else value).contiguous().clone()
        for name, value in state.items()
    }
    metadata = {"format": "pt", "dtype": dtype, "step": str(info.step), "checkpoint": url}
    with storage.staged_local_file(".safetensors") as scratch:
        save_file(tensors, scratch, metadata=metadata)
        storage.publish_file(scratch, out)
    config_url = None
    if MODEL_CONFIG_FILE in info.files:
        config_url = exported_config_path(out)
        storage.write_bytes_atomic(config_url, json.dumps(read_model_config(url), indent=2).encode())
    else:
        log.warning("%s has no %s: exported the weights only", url, MODEL_CONFIG_FILE)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"weights": out, "config": config_url, "dtype": dtype, "step": info.step, "bytes": size}


def load_exported(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state_dict, model config or None)`` of an :func:`export_model` file."""
    from safetensors.torch import load

    config_url = exported_config_path(path)
    config = json.loads(storage.read_bytes(config_url)) if storage.exists(config_url) else None
    return load(storage.read_bytes(path)), config
