"""Launched by tests/test_dalle_moe.py under ``torchrun --nproc_per_node 2`` (gloo, DS_ACCELERATOR=cpu).

Two checks in one launch (a launch costs seconds, a check a fraction of one):

- ``ep``: a tiny DALL-E whose FFNs are 4-expert top-1 MoE layers, trained with the same weights and
  the same per-rank batches as ``ep_size=1`` (every rank holds all experts) and ``ep_size=2`` (each
  rank holds two; tokens cross ranks by all-to-all). The losses must agree.
- ``resume``: top-2 gating with ``ep_size=2`` draws noise from the torch RNG. Six uninterrupted steps
  against three steps, a checkpoint, a fresh engine (after scrambling the RNG) loading it, three more.
  ``no_rng`` repeats the resume without restoring the RNG, to show the check would notice.
- ``sample``: the top-2 checkpoint is left in WORKDIR/top2 for the parent test to sample from, with
  what each rank held (WORKDIR/held-rank-R.pt, experts under their global index) as the oracle, and a
  tiny random dVAE checkpoint (WORKDIR/dvae) whose codes fit the transformer.

Usage: ``dalle_moe.py OUT.json WORKDIR``; rank 0 writes the losses to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer
from trainer.config import EngineConfig
from trainer.engine import Engine, init_distributed
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.models.dvae import DVAE, DVAEConfig
from trainer.models.moe import MoEConfig
from trainer.stages.dalle import make_loss_fn

STEPS = 6
MICRO = 2


def model_config(ep_size: int, top_k: int) -> DalleConfig:
    moe = MoEConfig(enabled=True, every=1, num_experts=4, top_k=top_k, ep_size=ep_size, aux_loss_weight=0.01)
    return DalleConfig(
        text_vocab_size=264,  # room for a byte-level tokenizer's 260 ids: the parent test samples from it
        text_len=6,
        image_vocab_size=16,
        image_side=4,
        depth=2,
        heads=2,
        head_dim=8,
        attention_cycle=["row", "column"],
        moe=moe,
    )


def renumber_expert(name: str, offset: int, local_experts: int | None = None) -> str | None:
    """``...deepspeed_experts.<e>...`` with e shifted by ``offset``; None if the result is not below
    ``local_experts`` (global -> local on a rank: offset -rank * local_experts; local -> global: +)."""
    marker = "deepspeed_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker, 1)
    index, rest = tail.split(".", 1)
    shifted = int(index) + offset
    if local_experts is not None and not 0 <= shifted < local_experts:
        return None
    return f"{head}{marker}{shifted}.{rest}"


def build(ep_size: int, top_k: int) -> DalleTransformer:
    """Weights of the ep_size=1 model built from seed 0, sharded to this rank's experts."""
    torch.manual_seed(0)
    full = DalleTransformer(model_config(1, top_k)).state_dict()
    model = DalleTransformer(model_config(ep_size, top_k))
    local = {}
    for name, value in full.items():
        rank = dist.get_rank() if ep_size > 1 else 0
        renamed = renumber_expert(name, -rank * (4 // ep_size), 4 // ep_size)
        if renamed is not None:
            local[renamed] = value
    model.load_state_dict(local)
    return model


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        text = torch.randint(1, 40, (MICRO, 6), generator=generator)
        text[:, 4:] = 0
        out.append({"text": text, "codes": torch.randint(0, 16, (MICRO, 16), generator=generator)})
    return out


def engine_for(ep_size: int, top_k: int) -> Engine:
    config = EngineConfig(zero_stage=2, micro_batch_size=MICRO, lr=3e-3, total_steps=STEPS, grad_clip=1.0)
    model = build(ep_size, top_k)
    return Engine(model, config, make_loss_fn(model.config))


def seed_rng() -> None:
    torch.manual_seed(1000 + dist.get_rank())  # routing noise: same stream in every configuration


def expert_parallel(data: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    result = {}
    for ep_size in (1, 2):
        engine = engine_for(ep_size, top_k=1)
        seed_rng()
        steps = [engine.train_step(batch) for batch in data]
        result[f"ep{ep_size}"] = [s.loss for s in steps]
        result[f"ep{ep_size}_aux"] = [s.metrics["moe_aux_loss"] for s in steps]
    return result


def top2_resume(data: list[dict[str, torch.Tensor]], workdir: str) -> dict[str, list[float]]:
    reference = engine_for(2, top_k=2)
    seed_rng()
    result = {"reference": [reference.train_step(batch).loss for batch in data]}
    first = engine_for(2, top_k=2)
    seed_rng()
    head = [first.train_step(batch).loss for batch in data[:3]]
    checkpointer = Checkpointer(f"{workdir}/top2", keep_last=1)
    url = checkpointer.save(first)
    held = {renumber_expert(n, dist.get_rank() * 2): p.detach() for n, p in first.module.named_parameters()}
    torch.save(held, f"{workdir}/held-rank-{dist.get_rank()}.pt")
    for restore_rng, key in ((True, "resumed"), (False, "no_rng")):
        second = engine_for(2, top_k=2)
        torch.manual_seed(4242)  # whatever a new process would have: the checkpoint must fix it
        checkpointer.load(second, url)
        if not restore_rng:
            torch.manual_seed(4242)  # the control: engine and weights restored, the RNG not
        result[key] = head + [second.train_step(batch).loss for batch in data[3:]]
    return result


def save_dvae(workdir: str) -> str:
    """A random tiny dVAE whose codes fit the transformer (16 codes on a 4x4 grid of 32 px images)."""
    torch.manual_seed(0)
    config = DVAEConfig(image_size=32, vocab_size=16, hidden=8, blocks_per_group=1, decoder_init_channels=8)
    engine = Engine(DVAE(config), EngineConfig(micro_batch_size=1, total_steps=1), lambda *_: None)
    return Checkpointer(f"{workdir}/dvae").save(engine)


def main(out_path: str, workdir: str) -> None:
    init_distributed()
    data = batches(dist.get_rank())
    results = {"ep": expert_parallel(data), "resume": top2_resume(data, workdir), "dvae": save_dvae(workdir)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
