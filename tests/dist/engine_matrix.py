"""Launched by tests/test_engine.py under ``torchrun --nproc_per_node 2``: every ZeRO stage, dtype and
accumulation setting in one launch (a launch costs seconds; a config costs a fraction of one).

For each config it trains a tiny MLP three ways on the same per-rank batches:
- ``reference``: 6 uninterrupted optimizer steps;
- ``resumed``: 3 steps with a NaN batch injected after the first, a checkpoint, a brand-new model
  and engine loading it, then the remaining 3 steps;
- ``nan_streak``: K NaN batches in a row must stop the run with NonFiniteLossError.
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
from trainer.engine import Engine, NonFiniteLossError, init_distributed

STEPS = 6
MICRO = 4
CONFIGS = [
    (stage, dtype, accum)
    for stage in (0, 1, 2, 3)
    for dtype, accum in (("fp32", 1), ("fp32", 2), ("bf16", 2))
]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batches(rank: int, accum: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    size = MICRO * accum
    return [
        {"x": torch.randn(size, 8, generator=generator), "y": torch.randn(size, 1, generator=generator)}
        for _ in range(STEPS)
    ]


def nan_batch(accum: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((MICRO * accum, 8), float("nan")), "y": torch.zeros(MICRO * accum, 1)}


def mse(model, batch, step):
    prediction = model(batch["x"]).float()
    return ((prediction - batch["y"].float()) ** 2).mean()


def engine_for(stage: int, dtype: str, accum: int, seed: int) -> Engine:
    config = EngineConfig(
        zero_stage=stage,
        dtype=dtype,
        micro_batch_size=MICRO,
        grad_accum=accum,
        lr=1e-2,
        weight_decay=0.01,
        warmup_steps=2,
        total_steps=STEPS,
        grad_clip=1.0,
    )
    return Engine(make_model(seed), config, mse, max_nonfinite_in_a_row=3)


def parameters(engine: Engine) -> list[list[float]]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.config.zero_stage == 3):
        return [p.detach().float().flatten().tolist() for p in params]


def run_config(stage: int, dtype: str, accum: int, workdir: str) -> dict:
    data = batches(dist.get_rank(), accum)
    reference = engine_for(stage, dtype, accum, seed=0)
    reference_losses = [reference.train_step(batch).loss for batch in data]
    result = {"reference": reference_losses, "reference_params": parameters(reference)}

    first = engine_for(stage, dtype, accum, seed=0)
    steps = [first.train_step(data[0]), first.train_step(nan_batch(accum))]
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
            streak.train_step(nan_batch(accum))
        result["streak_error"] = None
    except NonFiniteLossError as exc:
        result["streak_error"] = str(exc)
    result["streak_params_unchanged"] = parameters(streak) == before
    return result


def main(out_path: str, workdir: str) -> None:
    init_distributed()
    results = {}
    for stage, dtype, accum in CONFIGS:
        results[f"zero{stage}-{dtype}-accum{accum}"] = run_config(stage, dtype, accum, workdir)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
