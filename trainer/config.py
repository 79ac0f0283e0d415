"""Config sections every training stage shares: ``[run]``, ``[engine]`` and ``[data]``.

A stage's config composes these with its own ``[model]`` and stage section, so the engine, the
checkpointer and the CLI read the same typed fields whatever model is being trained. Checks that
would otherwise fail minutes into a launch (fp16 without CUDA, an impossible schedule) fail here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RunConfig(BaseModel):
    """Where a run lives, how often it logs and checkpoints, and how it resumes."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    run_dir: str | None = None  # default: the CLI's --run-dir
    seed: int = 0
    experiment: str = "tessera"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int | None = Field(None, ge=1)  # default: checkpoint_every
    keep_last: int = Field(2, ge=1)
    # Also keep the checkpoint with the best value of this metric (one of the stage's eval metrics).
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    resume: str = "auto"  # "auto" | "never" | a checkpoint path or URL
    # Ray launcher: restarts of a failed worker group; each resumes per `resume` ("auto": newest checkpoint).
    max_failures: int = Field(2, ge=0)
    checkpoint_dir: str | None = None  # local path or s3:// URL; default <run_dir>/checkpoints
    max_nonfinite_in_a_row: int = Field(5, ge=1)
    peak_tflops: float | None = Field(None, gt=0)  # per device; overrides the known-device table


class EngineConfig(BaseModel):
    """What DeepSpeed is asked to do: ZeRO stage, precision, batch, optimiser and LR schedule."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(0, ge=0, le=3)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    total_steps: int = Field(1000, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    activation_checkpointing: bool = False
    offload_optimizer: bool = False  # ZeRO-1/2/3 only; uses DeepSpeedCPUAdam (compiled once)
    torch_adam: bool = True  # torch's AdamW: no C++ build; set false on GPU for fused Adam

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.dtype == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("dtype 'fp16' needs a CUDA GPU (CPUs cannot run fp16 training); use 'bf16'")
        if not self.torch_adam and self.zero_stage == 0 and self.dtype == "fp32":
            raise ValueError(
                "torch_adam=false with zero_stage 0 and fp32 cannot skip non-finite steps; "
                "use torch_adam=true, bf16 or zero_stage >= 1"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1): {self.betas}")
        return self


class DataConfig(BaseModel):
    """Which ingested dataset to read and how."""

    model_config = ConfigDict(extra="forbid")

    manifest: str  # URL of a manifest.json written by `tessera ingest`
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True  # samples in a seeded order within windows of shards; False: tar order per shard
    window_shards: int = Field(16, ge=1)  # shards a rank mixes at a time (each worker holds their bytes)
    tokenizer: str | None = None  # tokenizer.json URL, for stages that read captions
    text_len: int = Field(64, ge=1)
    validation_manifest: str | None = None  # held-out data for eval; default: the first training samples
    validation_batch_size: int = Field(16, ge=1)  # the fixed batch eval metrics are measured on


def config_hash(config: BaseModel) -> str:
    """sha256 of a config's content minus how it resumes, stored in every checkpoint.

    ``run.resume`` is left out so resuming the same run from an explicit path matches.
    """
    data = config.model_dump(mode="json")
    if isinstance(data.get("run"), dict):
        data["run"] = {k: v for k, v in data["run"].items() if k != "resume"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
