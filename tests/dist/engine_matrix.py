"""Launched by tests/test_engine.py under ``torchrun --nproc_per_node 2``: every ZeRO stage, dtype and
accumulation setting in one launch (a launch costs seconds; a config costs a fraction of one).

For each config it trains a tiny MLP three ways on the same per-rank batches (every config sees the
same 8 samples per rank and step, cut into ``accum`` micro-batches of ``8 // accum``):
- ``reference``: 6 uninterrupted optimizer steps, with their losses and pre-clip gradient norms;
- ``resumed``: 3 steps with a NaN batch injected after the first, a checkpoint, a brand-new model
  and engine loading it, then the remaining 3 steps;
- ``nan_streak``: K NaN batches in a row must stop the run with NonFiniteLossError.
Beside them, ``oracle`` trains the same initial weights in plain float64 torch on the whole global batch
(both ranks' samples, one backward, no DeepSpeed, no accumulation): what every fp32 config must match.
Usage: ``engine_matrix.py OUT.json SHARED_DIR``; rank 0 writes losses, parameters and errors to OUT.json.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer
from trainer.config import EngineConfig
from trainer.engine import Engine, NonFiniteLossError, init_distributed, lr_multiplier

STEPS = 6
BATCH = 8  # samples per rank per optimizer step, whatever the accumulation
LR, WEIGHT_DECAY, WARMUP, CLIP = 1e-2, 0.01, 2, 1.0
CONFIGS = [
    (stage, dtype, accum)
    for stage in (0, 1, 2, 3)
    for dtype, accum in (("fp32", 1), ("fp32", 2), ("bf16", 2))
]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        {"x": torch.randn(BATCH, 8, generator=generator), "y": torch.randn(BATCH, 1, generator=generator)}
        for _ in range(STEPS)
    ]


def nan_batch() -> dict[str, torch.Tensor]:
    return {"x": torch.full((BATCH, 8), float("nan")), "y": torch.zeros(BATCH, 1)}


def mse(model, batch, step):
    prediction = model(batch["x"]).float()
    return ((prediction - batch["y"].float()) ** 2).mean()


def engine_for(stage: int, dtype: str, accum: int, seed: int) -> Engine:
    config = EngineConfig(
        zero_stage=stage,
        dtype=dtype,
        micro_batch_size=BATCH // accum,
        grad_accum=accum,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=WARMUP,
        total_steps=STEPS,
        grad_clip=CLIP,
    )
    return Engine(make_model(seed), config, mse, max_nonfinite_in_a_row=3)


def parameters(engine: Engine) -> list[list[float]]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.config.zero_stage == 3):
        return [p.detach().float().flatten().tolist() for p in params]


def oracle(world_size: int) -> dict:
    """Plain float64 torch, written from the definitions: per step, the mean squared error over every
    rank's samples at once, one backward, clip the global norm, AdamW with decay on matrices only."""
    model = make_model(seed=0).double()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
    )
    data = [batches(rank) for rank in range(world_size)]
    losses, grad_norms = [], []
    for step in range(STEPS):
        x = torch.cat([per_rank[step]["x"] for per_rank in data]).double()
        y = torch.cat([per_rank[step]["y"] for per_rank in data]).double()
        errors = (model(x) - y) ** 2
        losses.append(float(errors[:BATCH].mean()))  # what rank 0 reports: the mean over its samples
        optimizer.zero_grad()
        errors.mean().backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        multiplier = lr_multiplier(step, warmup_steps=WARMUP, total_steps=STEPS, min_lr_ratio=0.1)
        for group in optimizer.param_groups:
            group["lr"] = LR * multiplier
        optimizer.step()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "params": [p.detach().flatten().tolist() for p in params],
    }


def run_config(stage: int, dtype: str, accum: int, workdir: str) -> dict:
    data = batches(dist.get_rank())
    reference = engine_for(stage, dtype, accum, seed=0)
    reference_steps = [reference.train_step(batch) for batch in data]
    result = {
        "reference": [s.loss for s in reference_steps],
        "reference_grad_norms": [s.grad_norm for s in reference_steps],
        "reference_params": parameters(reference),
    }

    first = engine_for(stage, dtype, accum, seed=0)
    steps = [first.train_step(data[0]), first.train_step(nan_batch())]
    steps += [first.train_step(batch) for batch in data[1:3]]
    checkpointer = Checkpointer(f"{workdir}/z{stage}-{dtype}-{accum}", keep_last=1)
    url = checkpointer.save(first, loader_state={"rank": dist.get_rank()})
    second = engine_for(stage, dtype, accum, seed=123)  # different init: weights must come from disk
    state = checkpointer.load(second, url)
    steps += [second.train_step(batch) for batch in data[3:]]
    result.update(
        resumed=[s.loss for s in steps if not s.nonfinite],
        skipped=[s.step for s in steps if not s.applied],
        grad_norms=[s.grad_norm for s in steps],
        resumed_params=parameters(second),
        loader_states=state["loader_states"],
        lr_after=second.lr,
        nonfinite_total=second.nonfinite_total,
    )

    streak = engine_for(stage, dtype, accum, seed=0)
    streak.train_step(data[0])
    before = parameters(streak)
    try:
        for _ in range(3):
            streak.train_step(nan_batch())
        result["streak_error"] = None
    except NonFiniteLossError as exc:
        result["streak_error"] = str(exc)
    result["streak_params_unchanged"] = parameters(streak) == before
    return result


def main(out_path: str, workdir: str) -> None:
    init_distributed()
    results = {"oracle": oracle(dist.get_world_size())}
    for stage, dtype, accum in CONFIGS:
        results[f"zero{stage}-{dtype}-accum{accum}"] = run_config(stage, dtype, accum, workdir)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
