"""Launched by tests/test_diffusion_ema.py under ``torchrun --nproc_per_node 2``: the EMA under ZeRO-2.

Trains a small net wrapped in ``WithEMA`` through the real Engine (ZeRO-2, fp32) on per-rank halves of
each global batch, with a NaN batch in the middle (a skipped step must not move the EMA), and:
- ``ema``: each rank's EMA after the run (they must agree, and match a single-process float64 oracle:
  plain AdamW on the whole batch, the EMA written from its closed form);
- ``resumed_ema``: the same run checkpointed halfway, loaded into a freshly built model whose
  weights AND EMA differ, and finished: it must equal the uninterrupted EMA bit for bit.
Usage: ``diffusion_ema.py OUT.json SHARED_DIR``; rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer
from trainer.config import EngineConfig
from trainer.diffusion.ema import WithEMA, applied_optimizer_steps
from trainer.engine import Engine, init_distributed, lr_multiplier

STEPS, PER_RANK, LR, DECAY = 6, 4, 1e-2, 0.9


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.SiLU(), torch.nn.Linear(12, 2))


def global_batches(world_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    size = PER_RANK * world_size
    return [
        {"x": torch.randn(size, 6, generator=generator), "y": torch.randn(size, 2, generator=generator)}
        for _ in range(STEPS)
    ]


def loss_fn(model, batch, step):
    module = model.module
    module.ema.follow(module.net, applied_optimizer_steps(model))  # what the diffusion stage does
    return (model(batch["x"]).float() - batch["y"].float()).square().mean()


def engine_for(seed: int) -> Engine:
    config = EngineConfig(zero_stage=2, micro_batch_size=PER_RANK, lr=LR, total_steps=STEPS, grad_clip=0.0)
    return Engine(WithEMA(make_net(seed), DECAY), config, loss_fn)


def ema_values(engine: Engine) -> list[float]:
    module = engine.module
    module.ema.follow(module.net, applied_optimizer_steps(engine.ds))  # fold in the last step
    return torch.cat([t.flatten() for t in module.ema.state_for().values()]).tolist()


def oracle(world_size: int) -> list[float]:
    """Single process, float64: AdamW on the whole global batch, then EMA_K from its closed form
    ``prod(d) p_0 + sum_k (1 - d_k) prod_{j > k} d_j p_k`` over the applied steps' weights."""
    net = make_net(0).double()
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.0},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
    )
    snapshots = [torch.cat([p.detach().flatten() for p in params]).clone()]
    for step, batch in enumerate(global_batches(world_size)):
        optimizer.zero_grad()
        (net(batch["x"].double()) - batch["y"].double()).square().mean().backward()
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_multiplier(step, warmup_steps=0, total_steps=STEPS, min_lr_ratio=0.1)
        optimizer.step()
        snapshots.append(torch.cat([p.detach().flatten() for p in params]).clone())
    decays = [min(DECAY, (1 + k) / (10 + k)) for k in range(1, len(snapshots))]
    ema = snapshots[0] * torch.tensor(decays, dtype=torch.float64).prod()
    for k in range(1, len(snapshots)):
        ema = ema + (1 - decays[k - 1]) * torch.tensor(decays[k:], dtype=torch.float64).prod() * snapshots[k]
    return ema.tolist()


def main() -> None:
    out, workdir = sys.argv[1], sys.argv[2]
    rank, world_size = init_distributed()
    mine = [
        {key: value[rank * PER_RANK : (rank + 1) * PER_RANK] for key, value in batch.items()}
        for batch in global_batches(world_size)
    ]
    nan = {"x": torch.full((PER_RANK, 6), float("nan")), "y": torch.zeros(PER_RANK, 2)}

    straight = engine_for(seed=0)
    for index, batch in enumerate(mine):
        straight.train_step(batch)
        if index == 2:
            assert not straight.train_step(nan).applied
    ema = ema_values(straight)

    first = engine_for(seed=0)
    for batch in mine[:3]:
        first.train_step(batch)
    assert not first.train_step(nan).applied
    checkpointer = Checkpointer(f"{workdir}/ema-z2", keep_last=1)
    url = checkpointer.save(first)
    second = engine_for(seed=99)  # different weights, so a different EMA too, until the load
    checkpointer.load(second, url)
    for batch in mine[3:]:
        second.train_step(batch)
    resumed = ema_values(second)

    gathered: list[list[float]] = [[] for _ in range(world_size)]
    dist.all_gather_object(gathered, ema)
    if rank == 0:
        result = {
            "ema_per_rank": gathered,
            "resumed_ema": resumed,
            "oracle": oracle(world_size),
            "num_updates": int(straight.module.ema.num_updates),
            "ema_dtype": str(straight.module.ema.state_for()["0.weight"].dtype),
        }
        with open(out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()


if __name__ == "__main__":
    main()
