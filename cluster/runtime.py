"""Connecting to Ray: a private local cluster by default, or an existing one by address."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from cluster import environment
from data_pipeline import storage

log = logging.getLogger(__name__)

# Environment a worker process needs to reach the same object store and MLflow server as the driver.
# Secrets are in it only on request (data_pipeline.storage.ray_task_env).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "GLOO_SOCKET_IFNAME",
    "TORCH_EXTENSIONS_DIR",
)


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """``env`` less a tracking URI with ``user:password@`` in it, unless forwarding is requested."""
    if storage.forwards_secrets() or "@" not in env.get("MLFLOW_TRACKING_URI", ""):
        return env
    return {name: value for name, value in env.items() if name != "MLFLOW_TRACKING_URI"}


def worker_env() -> dict[str, str]:
    """``runtime_env`` env vars for every worker: the settings above plus ``storage.ray_task_env()``.

    Ray writes these in plain text to its logs and job table, so object-store secrets are left out
    unless ``TESSERA_FORWARD_CREDENTIALS=1`` (warned about here): a local cluster inherits this
    process's environment, and cluster nodes get credentials from their own.
    """
    if storage.forwards_secrets():
        log.warning(
            "%s=1: object-store credentials go to Ray workers through runtime_env, which Ray writes in "
            "plain text to its logs (runtime_env_agent.log) and job table",
            storage.FORWARD_SECRETS_ENV,
        )
    settings = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return without_secrets({**settings, **storage.ray_task_env()})


def _not_set_by_the_job(env_vars: dict[str, str], ray: Any) -> dict[str, str]:
    """Inside a Ray job (``tessera submit``) the job's runtime_env already reaches every worker, and
    ``ray.init`` refuses a runtime_env naming any of the job's env vars again: leave those out."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return env_vars
    job_env = ray.job_config.JobConfig.from_json(json.loads(injected)).runtime_env.get("env_vars") or {}
    return {name: value for name, value in env_vars.items() if name not in job_env}


def init_ray(address: str = "local", num_cpus: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start (``"local"``) or join (``"auto"``, ``ray://host:10001``) a Ray cluster once per process."""
    environment.configure()  # before Ray is imported: it reads some settings at import
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    options: dict[str, Any] = {
        "runtime_env": {"env_vars": _not_set_by_the_job(worker_env(), ray)},
        "include_dashboard": False,
        "log_to_driver": True,
        **kwargs,
    }
    if address == "local":
        options["address"] = "local"
        options["num_cpus"] = num_cpus or os.cpu_count()
        options.setdefault("_temp_dir", tempfile.mkdtemp(prefix="tessera-ray-"))
    else:
        options["address"] = address
        options.pop("include_dashboard")
    ray.init(**options)
    return ray.cluster_resources()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
