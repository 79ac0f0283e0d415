"""Connecting to Ray: a private local cluster by default, or an existing one by address."""

from __future__ import annotations

import os
import tempfile
from typing import Any

# Ray reads these at import time: advertise loopback for a local cluster and let `ray job submit`
# work without a token on a developer box. A real cluster's settings override them.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from data_pipeline.storage import CREDENTIAL_ENV  # noqa: E402

# Environment a worker process needs to reach the same object store and MLflow server as the driver.
FORWARDED_ENV = (
    *CREDENTIAL_ENV,
    "MLFLOW_TRACKING_URI",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "GLOO_SOCKET_IFNAME",
    "TORCH_EXTENSIONS_DIR",
)


def init_ray(address: str = "local", num_cpus: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start (``"local"``) or join (``"auto"``, ``ray://host:10001``) a Ray cluster once per process.

    Credentials travel to workers through ``runtime_env`` env vars, never through task arguments,
    so they do not show up in the Ray dashboard's task table.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options: dict[str, Any] = {
        "runtime_env": {"env_vars": env_vars},
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
    if ray.is_initialized():
        ray.shutdown()
