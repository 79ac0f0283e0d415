"""Checks a command runs before any heavy work: every input it names exists, every output is writable.

A missing manifest used to surface after DeepSpeed start-up, minutes in; here it fails in a second
(or after ``TESSERA_STORAGE_RETRY_S`` for an unreachable object store) with the field and the URL.
The CLI turns these errors into one line and exit status 2.
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline import storage
from data_pipeline.manifest import load_manifest

BUILTIN_SOURCES = ("synthetic", "digits")  # generated, not read
# Fields naming another run's checkpoint that the stage loads (after ``resolve_stage_inputs``).
UPSTREAM_CHECKPOINTS = (("dalle", "dvae_checkpoint"), ("diffusion", "autoencoder_checkpoint"))


def require(url: str, field: str) -> None:
    if not storage.exists(url):
        raise FileNotFoundError(f"{field}: {url} does not exist")


def require_writable(url: str, field: str) -> None:
    """A local folder is created (with its parents) and must accept files; an S3 URL's bucket must exist."""
    if not storage.is_local(url):
        bucket = "/".join(url.split("/", 3)[:3])
        require(bucket, f"{field} (bucket)")
        return
    path = url.removeprefix("file://")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"{field}: cannot create {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{field}: {path} is not writable")


def check_training_inputs(config: Any) -> None:
    """What ``tessera train`` reads and writes, checked before DeepSpeed or Ray start."""
    data, run = config.data, config.run
    for name in ("manifest", "validation_manifest"):
        url = getattr(data, name, None)
        if url:
            load_manifest(url)  # raises ManifestError naming the location
    if getattr(data, "tokenizer", None):
        require(data.tokenizer, "data.tokenizer")
    if run.resume not in ("auto", "never"):
        require(run.resume, "run.resume")
    for section_name, field in UPSTREAM_CHECKPOINTS:
        section = getattr(config, section_name, None)
        url = getattr(section, field, None) if section is not None else None
        if url and url != "auto":
            require(url, f"{section_name}.{field}")
    require_writable(run.run_dir, "run.run_dir")
    if run.checkpoint_dir:
        require_writable(run.checkpoint_dir, "run.checkpoint_dir")


def check_ingest_paths(config: Any) -> None:
    """``tessera ingest``'s source exists and its destination is writable, checked before Ray starts."""
    if config.source not in BUILTIN_SOURCES and not any(char in config.source for char in "*?["):
        require(config.source, "ingest.source")
    if config.dest:
        require_writable(config.dest, "ingest.dest")
