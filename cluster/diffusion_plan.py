"""``tessera plan`` for a latent diffusion preset (e.g. ``configs/diffusion/sd-class.toml``).

The DALL-E planner models a transformer's activations per layer; a UNet's layers change shape with
resolution, so here everything is read off one forward of a meta-device copy: parameters, the
training FLOPs per sample (``FlopCounterMode``), and the activation bytes per sample as the sum of
every leaf module's output (what autograd keeps for the backward, 2 bytes per value in bf16). Model
states (weights, gradients, Adam, ZeRO partitioning) use the DALL-E planner's ``model_state_bytes``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cluster.planner import GIB, PlanInputs, model_state_bytes


def activation_bytes_per_sample(model: torch.nn.Module, config: Any, bytes_per_value: int = 2) -> float:
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    with torch.device("meta"):
        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        x = torch.zeros(1, config.latent_channels, config.latent_size, config.latent_size)
        model(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, config.text.text_len, dtype=torch.long))
        for hook in hooks:
            hook.remove()
    return float(total * bytes_per_value)


def plan_denoiser(model_config: Any, inputs: PlanInputs) -> dict[str, Any]:
    from trainer.models import build, count_parameters

    model = build(model_config, device="meta")
    params = count_parameters(model)
    states = {
        name: value / GIB for name, value in model_state_bytes(params, inputs.gpus, inputs.zero_stage).items()
    }
    per_sample = activation_bytes_per_sample(model, model_config) / GIB
    if inputs.activation_checkpointing:
        per_sample /= 4  # block inputs kept, the rest recomputed: a rough factor, stated as such
    static = sum(states.values()) + inputs.reserve_gb
    activations = per_sample * inputs.micro_batch
    flops = model.flops_per_sample()
    samples_per_step = inputs.micro_batch * inputs.grad_accum * inputs.gpus
    step_time = samples_per_step * flops / (inputs.gpus * inputs.peak_tflops * 1e12 * inputs.mfu)
    total = static + activations
    return {
        "parameters": params,
        "train_flops_per_sample": flops,
        "memory_gb": {**states, "reserve": inputs.reserve_gb, "activations": activations},
        "activation_gb_per_sample": per_sample,
        "total_gb": total,
        "fits": total <= inputs.gpu_memory_gb,
        "max_micro_batch": max(0, math.floor((inputs.gpu_memory_gb - static) / per_sample)),
        "samples_per_step": samples_per_step,
        "step_time_s": step_time,
        "samples_per_s": samples_per_step / step_time,
    }


def table(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"parameters: {r['parameters'] / 1e6:.1f}M; "
        f"training FLOPs/sample: {r['train_flops_per_sample'] / 1e12:.2f}T"
    ]
    lines += [f"  {name:<28} {gb:8.2f} GiB" for name, gb in r["memory_gb"].items()]
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"  {'total':<28} {r['total_gb']:8.2f} GiB ({verdict})")
    lines.append(
        f"largest micro-batch: {r['max_micro_batch']}; "
        f"activations {r['activation_gb_per_sample']:.2f} GiB/sample"
    )
    lines.append(
        f"step: {r['samples_per_step']} samples in {r['step_time_s']:.2f} s "
        f"({r['samples_per_s']:.0f} samples/s)"
    )
    return "\n".join(lines)
