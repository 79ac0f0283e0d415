"""DeepSpeed behind a small ``Engine``: one training step, whatever the model.

The typed ``EngineConfig`` becomes a DeepSpeed config (ZeRO 0-3, bf16/fp16, accumulation, clipping),
the optimizer gets decay/no-decay (and MoE) parameter groups, and ``train_step`` runs the
micro-batches of one optimizer step. A non-finite loss never reaches the weights: every rank agrees
the step is bad, the gradients are poisoned so DeepSpeed's own overflow path drops the whole step,
and after ``max_nonfinite_in_a_row`` such steps the run stops with ``NonFiniteLossError``.
The LR follows warmup + cosine over *applied* steps, so a skipped step does not move the schedule.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import has_moe_layers, split_params_into_different_moe_groups_for_optimizer

from trainer.config import EngineConfig
from trainer.net import free_port

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per device from vendor datasheets: (bf16/fp16 tensor core, fp32 without TF32).
# Matched by substring of torch.cuda.get_device_name(); order matters (H100 before H10...).
KNOWN_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),
}

# loss_fn(model, micro_batch, step) -> loss or (loss, {name: scalar}); model is the DeepSpeed engine.
LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]
LossFn = Callable[[Any, Mapping[str, Any], int], LossOutput]


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW that the Engine can tell to leave one step out.

    Only used bare (ZeRO-0, fp32), where no DeepSpeed wrapper checks for overflow. DeepSpeed reads
    ``overflow`` after ``step()`` and then counts the step as skipped, as it does for its own wrappers.
    """

    overflow = False
    skip_next = False

    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        return None if self.overflow else super().step(closure)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``max_nonfinite_in_a_row`` optimizer steps in a row."""


# DeepSpeed's shared-memory comm op: compiled on CPU at the first init_distributed, a world of one included.
COMM_OP = "deepspeed_shm_comm"


def comm_op_built() -> bool:
    """Whether torch's extension cache holds the compiled comm op (else the next start compiles it)."""
    from torch.utils.cpp_extension import get_default_build_root

    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(folder.glob(f"**/{COMM_OP}/{COMM_OP}*.so"))


def init_distributed() -> tuple[int, int]:
    """Join (or, with no launcher around, create) the process group; returns ``(rank, world_size)``.

    torchrun, the ``deepspeed`` launcher and Ray Train all export RANK/WORLD_SIZE/MASTER_*; a plain
    ``python`` run becomes a world of one on a free loopback port. Nothing is set at import: DeepSpeed
    detects the CPU accelerator itself, and launchers (``cluster.launch``) set the rest for their ranks.
    """
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the world of one talks over loopback
    if not torch.cuda.is_available() and not comm_op_built():
        log.warning(
            "DeepSpeed compiles its CPU comm op into %s now: once, ~1 min (make install prebuilds it)",
            os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extension folder"),
        )
    # Idempotent; wraps a process group Ray Train already created instead of making a second one.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps`` (flat after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_tflops(dtype: str, configured: float | None = None) -> float | None:
    """Per-device peak for MFU: the configured value, else the known-device table, else None (CPU)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (half, single) in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return single if dtype == "fp32" else half
    return None


def build_ds_config(config: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``config`` (no scheduler: the Engine owns the LR)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * world_size,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**9,  # the Engine logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if config.dtype == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif config.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    if config.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        # torch's AdamW on the offloaded fp32 partitions avoids compiling DeepSpeedCPUAdam.
        ds["zero_force_ds_cpu_optimizer"] = not config.torch_adam
    if not config.torch_adam:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": config.lr, "betas": list(config.betas), "eps": config.eps},
        }
    return ds


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases/norm gains; MoE experts in their own groups (DeepSpeed needs that)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if has_moe_layers(model)[0]:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def split_micro_batches(batch: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """Cut a batch of ``count * micro`` samples into ``count`` micro-batches along the first axis."""
    if count == 1:
        return [dict(batch)]
    sizes = {len(v) for v in batch.values() if isinstance(v, torch.Tensor | list | tuple)}
    if len(sizes) != 1 or next(iter(sizes)) % count:
        raise ValueError(f"batch sizes {sorted(sizes)} do not split into {count} equal micro-batches")
    size = next(iter(sizes)) // count
    return [
        {
            key: value[i * size : (i + 1) * size] if isinstance(value, torch.Tensor | list | tuple) else value
            for key, value in batch.items()
        }
        for i in range(count)
    ]


@dataclass
class StepResult:
    """What one optimizer step did, for logging; ``loss`` is the mean over its micro-batches."""

    step: int
    loss: float
    applied: bool
    nonfinite: bool
    lr: float
    grad_norm: float | None
    samples: int
    tokens: int
    step_time_s: float  # wall time: waiting for the batch and preparing it, then computing on it
    data_wait_fraction: float  # share of step_time_s spent waiting for / preparing the batch
    samples_per_s: float
    tokens_per_s: float
    tflops: float | None  # achieved per device, over the wall time
    mfu: float | None
    metrics: dict[str, float] = field(default_factory=dict)

    def log_metrics(self) -> dict[str, float]:
        values = {
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s if self.tokens else None,
            "data_wait_fraction": self.data_wait_fraction,
            "tflops": self.tflops,
            "mfu": self.mfu,
            **self.metrics,
        }
        return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


class Engine:
    """A DeepSpeed-wrapped model plus the loss that trains it, stepped one optimizer step at a time."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: EngineConfig,
        loss_fn: LossFn,
        *,
        flops_per_sample: float | None = None,
        tokens_per_sample: int = 0,
        peak_tflops_per_device: float | None = None,
        max_nonfinite_in_a_row: int = 5,
    ) -> None:
        self.rank, self.world_size = init_distributed()
        self.config = config
        self.loss_fn = loss_fn
        if config.activation_checkpointing:
            if not hasattr(model, "set_activation_checkpointing"):
                raise ValueError(f"{type(model).__name__} has no set_activation_checkpointing(enabled)")
            model.set_activation_checkpointing(True)
        if flops_per_sample is None and hasattr(model, "flops_per_sample"):
            flops_per_sample = model.flops_per_sample()
        self.flops_per_sample = flops_per_sample
        self.tokens_per_sample = tokens_per_sample
        self.peak_tflops = peak_tflops(config.dtype, peak_tflops_per_device)
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row

        groups = parameter_groups(model, config.weight_decay)
        optimizer = None
        if config.torch_adam:
            # ZeRO wrappers accept only the optimizer classes DeepSpeed knows; the subclass is for bare use.
            bare = config.zero_stage == 0 and config.dtype == "fp32"
            adamw = SkippableAdamW if bare else torch.optim.AdamW
            optimizer = adamw(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        self.ds, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer else groups,
            config=build_ds_config(config, self.world_size),
            dist_init_required=False,
        )
        self.device = self.ds.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.dtype]
        # DeepSpeed's ZeRO and bf16 wrappers skip a step whose gradients are non-finite on their own;
        # a bare optimizer (ZeRO-0 fp32) is told to by the Engine.
        self._bare_optimizer = self.ds.optimizer if isinstance(self.ds.optimizer, SkippableAdamW) else None
        self.step = 0  # optimizer steps attempted (applied + skipped)
        self.applied_steps = 0  # the LR schedule's clock
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._set_lr()

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def lr(self) -> float:
        return self.config.lr * lr_multiplier(
            self.applied_steps,
            warmup_steps=self.config.warmup_steps,
            total_steps=self.config.total_steps,
            min_lr_ratio=self.config.min_lr_ratio,
        )

    def _set_lr(self) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = self.lr

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        moved = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[key] = value
        return moved

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` holds on any rank: every rank must take the same branch or collectives hang."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def train_step(self, batch: Mapping[str, Any], data_wait_s: float = 0.0) -> StepResult:
        """One optimizer step over ``batch`` (this rank's ``micro_batch_size * grad_accum`` samples).

        ``data_wait_s``: how long the caller waited for and prepared ``batch``; rates and MFU are
        measured over that plus the compute, the wall time the step really took.
        """
        started = time.perf_counter() - data_wait_s
        micro_batches = split_micro_batches(batch, self.config.grad_accum)
        losses: list[float] = []
        grad_norm = None
        metric_sums: dict[str, float] = {}
        step_is_bad = False
        for micro in micro_batches:
            output = self.loss_fn(self.ds, self._to_device(micro), self.step)
            loss, metrics = output if isinstance(output, tuple) else (output, {})
            loss_value = float(loss.detach().float())
            bad = self._any_rank(not math.isfinite(loss_value))
            if bad:
                # NaN times the loss makes every gradient NaN, even where the loss's own gradient is
                # finite (a NaN added as a constant), so the overflow check drops the whole step.
                loss = loss * float("nan")
            step_is_bad |= bad
            self.ds.backward(loss)
            if self._bare_optimizer is not None and self.ds.is_gradient_accumulation_boundary():
                self._bare_optimizer.skip_next = step_is_bad
                grad_norm = self._bare_grad_norm()
            self.ds.step()
            losses.append(loss_value)
            for key, value in metrics.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else value
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)

        applied = self.ds.was_step_applied()
        if step_is_bad and applied:
            raise RuntimeError("DeepSpeed applied an optimizer step with non-finite gradients")
        if self._bare_optimizer is None:
            grad_norm = self.ds.get_global_grad_norm()
        grad_norm = float(grad_norm) if applied and grad_norm is not None else None
        self.step += 1
        if applied:
            self.applied_steps += 1
            self._set_lr()
        self._count_nonfinite(step_is_bad)
        return self._result(started, data_wait_s, losses, metric_sums, applied, step_is_bad, grad_norm)

    def _bare_grad_norm(self) -> float | None:
        """Pre-clip gradient norm for a bare optimizer, which DeepSpeed does not record."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _count_nonfinite(self, step_is_bad: bool) -> None:
        if not step_is_bad:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        log.warning(
            "step %d: non-finite loss, step skipped (%d in a row, %d in total)",
            self.step,
            self.nonfinite_in_a_row,
            self.nonfinite_total,
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            first = self.step - self.nonfinite_in_a_row + 1
            raise NonFiniteLossError(
                f"loss was non-finite for {self.nonfinite_in_a_row} optimizer steps in a row "
                f"(steps {first}..{self.step}); the weights are still those of step {first - 1}. "
                "Check the data and the learning rate before resuming."
            )

    def _result(
        self,
        started: float,
        data_wait_s: float,
        losses: list[float],
        metric_sums: dict[str, float],
        applied: bool,
        nonfinite: bool,
        grad_norm: float | None,
    ) -> StepResult:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        samples = self.config.micro_batch_size * self.config.grad_accum * self.world_size
        tokens = samples * self.tokens_per_sample
        tflops = mfu = None
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples / self.world_size / elapsed / 1e12
            mfu = tflops / self.peak_tflops if self.peak_tflops else None
        return StepResult(
            step=self.step,
            loss=sum(losses) / len(losses),
            applied=applied,
            nonfinite=nonfinite,
            lr=self.lr,
            grad_norm=grad_norm,
            samples=samples,
            tokens=tokens,
            step_time_s=elapsed,
            data_wait_fraction=data_wait_s / elapsed,
            samples_per_s=samples / elapsed,
            tokens_per_s=tokens / elapsed,
            tflops=tflops,
            mfu=mfu,
            metrics={key: total / len(losses) for key, total in metric_sums.items()},
        )

    def state_dict(self) -> dict[str, int]:
        """The Engine's counters; DeepSpeed's own state is saved by ``trainer.checkpoint``."""
        return {
            "step": self.step,
            "applied_steps": self.applied_steps,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])
        self.applied_steps = int(state["applied_steps"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self._set_lr()
