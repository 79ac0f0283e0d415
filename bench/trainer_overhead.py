"""What does the Engine cost over a hand-written PyTorch loop? (target: <= 1.10x step time)

Same model (the tiny dVAE, same initial weights), same loss, same AdamW + clipping + LR, same
in-memory batches; the Engine runs DeepSpeed ZeRO-0 in one process. The two loops alternate step by
step so machine load hits both alike, and the medians are compared.

    python bench/trainer_overhead.py [--steps 60] [--batch 32] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from trainer.config import EngineConfig
from trainer.engine import Engine, lr_multiplier
from trainer.models import build
from trainer.models.dvae import DVAEConfig
from trainer.stages.dvae import DVAESettings, DVAEStageConfig, make_loss

RESULTS = Path(__file__).parent / "results" / "trainer_overhead.json"


def plain_step(model, optimizer, loss_fn, batch, step, config: EngineConfig) -> float:
    """The loop a user would write: forward, backward, clip, AdamW, LR from the same schedule."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_multiplier(
            step,
            warmup_steps=config.warmup_steps,
            total_steps=config.total_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
    loss, _ = loss_fn(model, batch, step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    model_config = DVAEConfig(image_size=32, vocab_size=128, hidden=32, blocks_per_group=1, downsample=4)
    engine_config = EngineConfig(
        zero_stage=0, dtype="fp32", micro_batch_size=args.batch, lr=1e-3, warmup_steps=5, total_steps=1000
    )
    stage_config = DVAEStageConfig(
        engine=engine_config, data={"manifest": "unused"}, model=model_config, dvae=DVAESettings()
    )
    loss_fn = make_loss(stage_config)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.rand(args.batch, 3, 32, 32, generator=generator),
            "valid": torch.ones(args.batch, dtype=torch.bool),
        }
        for _ in range(8)
    ]

    torch.manual_seed(0)
    engine = Engine(build(model_config, "cpu"), engine_config, loss_fn)
    torch.manual_seed(0)
    plain_model = build(model_config, "cpu")
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for p in plain_model.parameters() if p.ndim >= 2],
                "weight_decay": engine_config.weight_decay,
            },
            {"params": [p for p in plain_model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=engine_config.lr,
        betas=engine_config.betas,
        eps=engine_config.eps,
    )

    engine_times, plain_times = [], []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        engine.train_step(batch)
        engine_elapsed = time.perf_counter() - started
        started = time.perf_counter()
        plain_step(plain_model, optimizer, loss_fn, batch, step, engine_config)
        plain_elapsed = time.perf_counter() - started
        if step >= args.warmup:
            engine_times.append(engine_elapsed)
            plain_times.append(plain_elapsed)

    engine_ms = statistics.median(engine_times) * 1e3
    plain_ms = statistics.median(plain_times) * 1e3
    ratio = engine_ms / plain_ms
    rows = [("plain PyTorch loop", plain_ms, 1.0), ("tessera Engine (DeepSpeed ZeRO-0)", engine_ms, ratio)]
    print(f"{'loop':<36}{'median step (ms)':>18}{'ratio':>8}")
    for name, ms, r in rows:
        print(f"{name:<36}{ms:>18.2f}{r:>8.3f}")
    print(f"target <= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'}")

    import deepspeed

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "trainer_overhead",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name()
                if torch.cuda.is_available()
                else f"CPU ({platform.processor() or platform.machine()})",
                "threads": torch.get_num_threads(),
                "versions": {
                    "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__,
                    "python": platform.python_version(),
                },
                "model": model_config.model_dump(),
                "batch_size": args.batch,
                "steps_measured": args.steps,
                "plain_median_ms": plain_ms,
                "engine_median_ms": engine_ms,
                "ratio": ratio,
                "target_ratio": 1.10,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
