"""Run one training function three ways: in this process, under torchrun, or on Ray Train.

``train_fn(config) -> dict`` is the same code in every mode: it calls ``trainer.engine.init_distributed``,
which joins whatever process group the launcher set up (a world of one, torchrun's ranks, or the
group Ray Train created). Rank 0's return value comes back to the caller.

- ``process``: call it here. Under an outside ``torchrun``/``deepspeed`` launcher (RANK set) this is
  also how each rank runs: multi-node jobs use the launchers directly.
- ``torchrun``: spawn ``num_workers`` local ranks (``python -m torch.distributed.run``) on a free
  master port, each re-entering this module with the function's import path and the config as JSON.
- ``ray``: a ``ray.train.torch.TorchTrainer`` with ``num_workers`` workers (gloo on CPU, NCCL on GPU)
  on a local Ray or an existing cluster (``ray_address``). Rank 0's result comes back as the train
  function's return value through Ray, not through files: a driver joining a remote cluster does not
  share its run folder with the workers.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from cluster.runtime import without_secrets
from data_pipeline import storage

TrainFn = Callable[[Any], dict[str, Any] | None]
Mode = Literal["process", "torchrun", "ray"]
RESULT_FILE = "result.json"
# What a CPU rank needs before torch/DeepSpeed import; a launcher's own values win.
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
WORKER_ENV = ("MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR", *CPU_ENV)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reference(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve(reference: str) -> Any:
    module, _, name = reference.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _worker_env() -> dict[str, str]:
    from trainer.tracking import default_tracking_uri

    env = {} if _cuda() else dict(CPU_ENV)
    env.update({name: os.environ[name] for name in WORKER_ENV if name in os.environ})
    env.update(storage.ray_task_env())  # object-store secrets only on request: Ray logs runtime_env
    # Workers do not start in this directory: pin the driver's default MLflow store for them.
    env.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    return without_secrets(env)


def launch(
    train_fn: TrainFn,
    config: BaseModel,
    *,
    mode: Mode = "process",
    num_workers: int = 1,
    ray_address: str = "local",
    storage_path: str | None = None,
    max_failures: int = 0,
) -> dict[str, Any] | None:
    """Run ``train_fn(config)`` on ``num_workers`` ranks; returns rank 0's result.

    ``max_failures`` (Ray only): how many times a failed worker group (a rank's process or node died)
    is restarted; each restart calls ``train_fn`` again, which resumes from the newest checkpoint
    when the config says ``run.resume = "auto"``.
    """
    if mode == "process":
        for name, value in ({} if _cuda() else CPU_ENV).items():
            os.environ.setdefault(name, value)
        return train_fn(config)
    if mode == "torchrun":
        return _launch_torchrun(train_fn, config, num_workers)
    if mode == "ray":
        return _launch_ray(train_fn, config, num_workers, ray_address, storage_path, max_failures)
    raise ValueError(f"unknown launch mode {mode!r}: use process, torchrun or ray")


def _launch_torchrun(train_fn: TrainFn, config: BaseModel, num_workers: int) -> dict[str, Any] | None:
    from trainer.net import free_port

    with tempfile.TemporaryDirectory(prefix="tessera-launch-") as scratch:
        config_path = Path(scratch) / "config.json"
        config_path.write_text(config.model_dump_json())
        result_path = Path(scratch) / RESULT_FILE
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(num_workers),
            "--master_port",
            str(free_port()),  # distinct per launch: parallel launches must not collide
            "-m",
            "cluster.launch",
            _reference(train_fn),
            _reference(type(config)),
            str(config_path),
            str(result_path),
        ]
        proc = subprocess.run(command, env={**os.environ, **_worker_env()})
        if proc.returncode != 0:
            raise RuntimeError(
                f"torchrun with {num_workers} ranks failed (exit {proc.returncode}); see its log above"
            )
        return json.loads(result_path.read_text()) if result_path.exists() else None


def _worker_main(fn_ref: str, schema_ref: str, config_path: str, result_path: str) -> None:
    """One torchrun rank: rebuild the config, train, and let rank 0 write the result."""
    config = _resolve(schema_ref).model_validate_json(Path(config_path).read_text())
    result = _resolve(fn_ref)(config)
    if os.environ.get("RANK", "0") == "0" and result is not None:
        Path(result_path).write_text(json.dumps(result, default=str))


def _ray_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Body of each Ray Train worker; Ray hands rank 0's return value to the driver (plain JSON types)."""
    result = loop_config["train_fn"](loop_config["config"])
    return None if result is None else json.loads(json.dumps(result, default=str))


def _launch_ray(
    train_fn: TrainFn,
    config: BaseModel,
    num_workers: int,
    ray_address: str,
    storage_path: str | None,
    max_failures: int,
) -> dict[str, Any] | None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.runtime import init_ray

    init_ray(ray_address)
    use_gpu = _cuda()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"train_fn": train_fn, "config": config},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"tessera-{uuid.uuid4().hex[:8]}",
            # Ray's own run state only: nothing of ours is written there or read back.
            storage_path=os.path.abspath(storage_path or tempfile.gettempdir()),
            worker_runtime_env={"env_vars": _worker_env()},
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    return result.return_value


if __name__ == "__main__":
    _worker_main(*sys.argv[1:5])
