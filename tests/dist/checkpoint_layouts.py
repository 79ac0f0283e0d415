"""Launched by tests/test_checkpoint.py under ``torchrun --nproc_per_node 2`` (gloo, DS_ACCELERATOR=cpu).

A tiny DALL-E trained two steps in bf16 under ZeRO-2 and ZeRO-3, where each rank holds only its
partition of the fp32 master copy, then checkpointed. The oracle for reading the checkpoint back is
that master copy as DeepSpeed's ``safe_get_full_fp32_param`` gathers it from the live optimizer
(written by rank 0 to WORKDIR/zero<stage>-master.pt beside WORKDIR/zero<stage>/).

Usage: ``checkpoint_layouts.py OUT.json WORKDIR``; rank 0 writes the checkpoint URLs to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from trainer.checkpoint import Checkpointer
from trainer.config import EngineConfig
from trainer.engine import Engine, init_distributed
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.stages.dalle import make_loss_fn

CONFIG = DalleConfig(
    text_vocab_size=40, text_len=6, image_vocab_size=16, image_side=4, depth=2, heads=2, head_dim=8
)


def save_trained(zero_stage: int, workdir: str) -> str:
    torch.manual_seed(0)
    engine_config = EngineConfig(zero_stage=zero_stage, dtype="bf16", micro_batch_size=2, lr=1e-2)
    engine = Engine(DalleTransformer(CONFIG), engine_config, make_loss_fn(CONFIG))
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(2):
        text = torch.randint(1, 40, (2, 6), generator=generator)
        engine.train_step({"text": text, "codes": torch.randint(0, 16, (2, 16), generator=generator)})
    url = Checkpointer(f"{workdir}/zero{zero_stage}").save(engine)
    # Collective under ZeRO-3 (it gathers the partitions): every rank calls it, rank 0 keeps it.
    master = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(master, f"{workdir}/zero{zero_stage}-master.pt")
    return url


def main(out_path: str, workdir: str) -> None:
    init_distributed()
    urls = {str(stage): save_trained(stage, workdir) for stage in (2, 3)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(urls, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
