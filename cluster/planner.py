"""Will a DALL-E preset fit a cluster, and how fast will it step? Arithmetic before renting GPUs.

Parameter counts come from the real model built on the meta device (no memory), so they follow the
code, not a formula that drifts from it. Everything else is the standard accounting:

- Model states use DeepSpeed's own byte counts for mixed-precision Adam (the ones behind
  ``estimate_zero2/3_model_states_mem_needs``): 2 bytes of 16-bit weights, then 18 bytes that ZeRO can
  partition (16-bit grads 2, fp32 grads 4, fp32 master weights 4, Adam moments 8). Stage 1 partitions
  the fp32 state, stage 2 also the 16-bit grads, stage 3 everything, plus a buffer for the largest
  gathered layer (16-bit weights and grads, 4 bytes/param). DeepSpeed's ZeRO-3 figure leaves out the
  16-bit weight shard itself (2 bytes/param over the group); we report it as its own line and count
  it against the memory budget.
- Expert parameters are split over ``ep_size`` ranks and ZeRO-partitioned over the ``gpus / ep_size``
  ranks that hold the same experts, as DeepSpeed's MoE groups do.
- Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"): ``s*b*h*34`` bytes in 16-bit with a fused (flash) attention kernel, plus
  ``5*a*s^2*b`` when the score matrix is materialised; with activation checkpointing only each
  layer's 16-bit input is kept, plus one layer being recomputed. Logits add 10 bytes per element
  (16-bit logits, their fp32 copy in the loss and its gradient).
- Step time = model FLOPs per step / (GPUs * peak * MFU), with the model's own
  ``flops_per_token`` (the same count ``trainer.engine`` uses for MFU): the attention tiles the fused
  kernel computes (column layers in column-major order), and every token's top_k experts however many
  ranks hold them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.models.dalle import DalleConfig, DalleTransformer

GIB = 2**30  # memory is reported in GiB, as DeepSpeed's estimators and nvidia-smi do
WEIGHT16_BYTES = 2
GRAD16_BYTES = 2
GRAD32_BYTES = 4
MASTER32_BYTES = 4
ADAM_BYTES = 8
GATHER_BYTES = 4  # ZeRO-3 gathered layer: 16-bit weights + 16-bit grads
LOGIT_BYTES = 10
LAYER_ACTIVATION_BYTES = 34  # per s*b*h, 16-bit, flash attention (Korthikanti et al. 2022, Eq. 2 less 5as/h)


class PlanInputs(BaseModel):
    """The cluster and the run settings the plan is for."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gb: float = Field(80.0, gt=0, description="GiB per GPU")
    peak_tflops: float = Field(312.0, gt=0, description="dense 16-bit peak per GPU (A100: 312, V100: 125)")
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation the step time assumes")
    zero_stage: int = Field(2, ge=0, le=3)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int | None = Field(None, ge=1, description="default: the model's full text+image sequence")
    activation_checkpointing: bool = True
    flash_attention: bool = Field(True, description="False: the attention score matrix is stored")
    reserve_gb: float = Field(
        3.0, ge=0, description="GiB for CUDA context, allocator slack, communication buffers"
    )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class ModelCensus:
    """What the plan needs to know about a model, read off a meta-device instance."""

    total_params: int
    expert_params: int  # all experts of all MoE layers
    largest_layer_params: int  # most parameters owned directly by one module (DeepSpeed's definition)
    flops_per_token: float  # training FLOPs per position, the model's count (computed tiles, top_k experts)
    attention_flops_per_token: float  # the attention part: scores in the tiles the kernel computes
    moe_layers: int
    depth: int
    width: int
    heads: int
    text_len: int
    text_classes: int
    image_len: int
    image_vocab: int
    moe_top_k: int
    moe_capacity_factor: float

    @property
    def dense_params(self) -> int:
        return self.total_params - self.expert_params


@dataclasses.dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    census: ModelCensus
    seq_len: int
    memory_gb: dict[str, float]  # per GPU, by component
    model_states_gb: float  # DeepSpeed's model-states figure (weights/grads/optimizer)
    activation_gb: float
    total_gb: float
    fits: bool
    max_micro_batch: int
    tokens_per_step: int
    step_time_s: float

    def as_dict(self) -> dict:
        return {
            "inputs": self.inputs.model_dump(),
            "census": dataclasses.asdict(self.census),
            **{k: v for k, v in dataclasses.asdict(self).items() if k not in ("inputs", "census")},
        }

    def table(self) -> str:
        c, i = self.census, self.inputs
        rows = [
            ("parameters", f"{c.total_params / 1e9:.3f} B ({c.expert_params / 1e9:.3f} B in experts)"),
            ("cluster", f"{i.nodes} x {i.gpus_per_node} GPUs x {i.gpu_memory_gb:g} GiB"),
            (
                "run",
                f"ZeRO-{i.zero_stage}, micro-batch {i.micro_batch}, accum {i.grad_accum}, "
                f"seq {self.seq_len}, "
                f"checkpointing {'on' if i.activation_checkpointing else 'off'}",
            ),
            *((f"  {name}", f"{value:8.2f} GiB") for name, value in self.memory_gb.items()),
            ("model states (DeepSpeed)", f"{self.model_states_gb:8.2f} GiB"),
            (
                "total per GPU",
                f"{self.total_gb:8.2f} GiB of {i.gpu_memory_gb:g} ({'fits' if self.fits else 'OOM'})",
            ),
            ("largest micro-batch", str(self.max_micro_batch)),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            (
                "model GFLOPs per token",
                f"{c.flops_per_token / 1e9:.2f} (attention {c.attention_flops_per_token / 1e9:.2f})",
            ),
            ("step time", f"{self.step_time_s:.2f} s at MFU {i.mfu:.0%} of {i.peak_tflops:g} TFLOPs"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def census(config: DalleConfig) -> ModelCensus:
    """Count a preset's parameters on the meta device (cached: a 12B build takes seconds)."""
    return _census(config.model_dump_json())


@functools.lru_cache(maxsize=16)
def _census(config_json: str) -> ModelCensus:
    config = DalleConfig.model_validate_json(config_json)
    with torch.device("meta"):
        model = DalleTransformer(config)
    moe = config.moe
    total = local_experts = largest = 0
    for name, module in model.named_modules():
        count = own_params(module)
        largest = max(largest, count)
        total += count
        if ".deepspeed_experts." in f".{name}.":
            local_experts += count
    # A rank builds only its num_experts / ep_size experts; the model has ep_size times as many.
    expert = local_experts * (moe.ep_size if moe.enabled else 1)
    total += expert - local_experts
    return ModelCensus(
        total_params=total,
        expert_params=expert,
        largest_layer_params=largest,
        flops_per_token=model.flops_per_token(),
        attention_flops_per_token=model.attention_flops_per_token(),
        moe_layers=sum(moe.is_moe_layer(i) for i in range(config.depth)),
        depth=config.depth,
        width=config.width,
        heads=config.heads,
        text_len=config.text_len,
        text_classes=config.text_classes,
        image_len=config.image_len,
        image_vocab=config.image_vocab_size,
        moe_top_k=moe.top_k,
        moe_capacity_factor=moe.capacity_factor,
    )


def model_state_bytes(params: float, group: int, zero_stage: int) -> dict[str, float]:
    """Per-GPU bytes of weights, grads and Adam state for ``params`` ZeRO-partitioned over ``group`` ranks."""
    shard = params / group
    fp32_state = (GRAD32_BYTES + MASTER32_BYTES + ADAM_BYTES) * (shard if zero_stage >= 1 else params)
    return {
        "weights (16-bit)": WEIGHT16_BYTES * (shard if zero_stage >= 3 else params),
        "grads (16-bit)": GRAD16_BYTES * (shard if zero_stage >= 2 else params),
        "fp32 grads + master + Adam": fp32_state,
    }


def activation_bytes(census: ModelCensus, inputs: PlanInputs, micro_batch: int, seq_len: int) -> float:
    s, b, h, a = seq_len, micro_batch, census.width, census.heads
    per_layer = s * b * h * LAYER_ACTIVATION_BYTES
    if not inputs.flash_attention:
        per_layer += 5 * a * s * s * b
    if inputs.activation_checkpointing:
        layers = census.depth * s * b * h * WEIGHT16_BYTES + per_layer
    else:
        layers = census.depth * per_layer
    # Expert dispatch and combine buffers: capacity_factor * k slots per token, in and out.
    moe = census.moe_layers * 2 * census.moe_top_k * census.moe_capacity_factor * s * b * h * WEIGHT16_BYTES
    text_positions = min(seq_len, census.text_len) - 1
    image_positions = max(seq_len - text_positions, 0)
    logits = b * (text_positions * census.text_classes + image_positions * census.image_vocab) * LOGIT_BYTES
    return layers + moe + logits


def plan(config: DalleConfig, inputs: PlanInputs) -> Plan:
    c = census(config)
    ep_size = config.moe.ep_size if config.moe.enabled else 1
    if inputs.gpus % ep_size:
        raise ValueError(f"{inputs.gpus} GPUs cannot be split into expert-parallel groups of {ep_size}")
    seq_len = inputs.seq_len or config.seq_len
    dense = model_state_bytes(c.dense_params, inputs.gpus, inputs.zero_stage)
    experts = model_state_bytes(c.expert_params / ep_size, inputs.gpus // ep_size, inputs.zero_stage)
    memory = {name: (dense[name] + experts[name]) / GIB for name in dense}
    if inputs.zero_stage == 3:
        memory["gathered layer (ZeRO-3)"] = GATHER_BYTES * c.largest_layer_params / GIB
    model_states = sum(memory.values())
    if inputs.zero_stage == 3:
        # DeepSpeed's ZeRO-3 estimate has no line for the 16-bit weight shard (see module docstring).
        model_states -= memory["weights (16-bit)"]
    per_sample = activation_bytes(c, inputs, 1, seq_len) / GIB
    activations = activation_bytes(c, inputs, inputs.micro_batch, seq_len) / GIB
    static = sum(memory.values()) + inputs.reserve_gb
    memory["reserve"] = inputs.reserve_gb
    memory["activations"] = activations
    total = static + activations
    tokens_per_step = inputs.micro_batch * inputs.grad_accum * inputs.gpus * seq_len
    step_time = tokens_per_step * c.flops_per_token / (inputs.gpus * inputs.peak_tflops * 1e12 * inputs.mfu)
    return Plan(
        inputs=inputs,
        census=c,
        seq_len=seq_len,
        memory_gb=memory,
        model_states_gb=model_states,
        activation_gb=activations,
        total_gb=total,
        fits=total <= inputs.gpu_memory_gb,
        max_micro_batch=max(0, math.floor((inputs.gpu_memory_gb - static) / per_sample)),
        tokens_per_step=tokens_per_step,
        step_time_s=step_time,
    )
