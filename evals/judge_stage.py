"""``tessera train judge``: the judge trained through the shared loop (engine, checkpoints, MLflow).

Targets come from each sample's stored ground truth (``meta``): per-cell shape/colour/size for
synthetic scenes, the label for digits; a head with no target for a sample is ignored for it. Every
evaluation reads the WHOLE held-out manifest (``data.validation_manifest``) and logs per-attribute
accuracy as ``heldout_acc_<attribute>``; at the end the judge card (config, vocabulary, held-out
accuracy) is written into the final checkpoint, where ``evals.judge.load_judge`` checks it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.loader import open_loader
from evals.accuracy import accuracies, count_correct
from evals.judge import Judge, JudgeModelConfig, judge_images, write_card
from evals.scenes import IGNORE, cell_labels
from evals.soften import soften
from trainer.config import DataConfig, EngineConfig, RunConfig, config_hash
from trainer.engine import Engine, init_distributed
from trainer.stages.loop import StageParts, run_training

HEADS = ("cell_shape", "cell_colour", "cell_size", "digit")


class JudgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_batch_size: int = Field(256, ge=1)
    grid_images: int = Field(16, ge=1)
    # Share of training images softened (evals.soften); held-out accuracy is also logged on softened
    # copies (heldout_soft_acc_*), while the card's bar stays on the clean held-out images.
    soften_probability: float = Field(0.0, ge=0, le=1)


class JudgeStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = RunConfig(name="judge")
    engine: EngineConfig = EngineConfig()
    data: DataConfig
    model: JudgeModelConfig = JudgeModelConfig()
    judge: JudgeSettings = JudgeSettings()

    @model_validator(mode="after")
    def _check(self) -> JudgeStageConfig:
        if not self.data.validation_manifest:
            raise ValueError("data.validation_manifest is required: the judge is measured on held-out data")
        return self


CONFIG = JudgeStageConfig


def prepare_batch(batch: Mapping[str, Any], soften_probability: float = 0.0) -> dict[str, Any]:
    """Loader batch -> images in [0, 1] (some softened) and per-head targets (padding carries none)."""
    labels = [cell_labels(meta) for meta in batch["meta"]]
    valid = batch["valid"].bool()
    images = batch["image"].float() / 255.0
    prepared = {"image": soften(images, soften_probability) if soften_probability else images}
    for head in HEADS:
        target = torch.tensor([row[head] for row in labels], dtype=torch.long)
        target[~valid] = IGNORE
        prepared[head] = target.squeeze(-1) if head == "digit" else target
    return prepared


def loss_fn(model, batch: Mapping[str, Any], step: int):
    """Sum over heads of the mean cross-entropy over present targets (a head with none adds 0)."""
    out = model(batch["image"])
    total = out["features"].new_zeros(())
    metrics = {}
    for head in HEADS:
        logits, target = out[head].float().reshape(-1, out[head].shape[-1]), batch[head].reshape(-1)
        # Most cells are empty: the shape head's loss averages empty and occupied cells separately,
        # so the shapes' gradient is not diluted ~4x by the easy "empty" class.
        groups = [target == 0, target > 0] if head == "cell_shape" else [target != IGNORE]
        for group in groups:
            if group.any():
                loss = F.cross_entropy(logits[group], target[group])
                total = total + loss
                metrics[f"loss_{head}"] = metrics.get(f"loss_{head}", 0.0) + loss.detach()
    return total, metrics


def heldout_counts(
    judge: Judge, config: JudgeStageConfig, softened: bool = False
) -> tuple[Counter[str], torch.Tensor]:
    """Correct/total per attribute over the whole held-out manifest (``softened``: every image softened,
    on a fixed seed), and its first images."""
    loader = open_loader(
        config.data.validation_manifest,
        rank=0,
        world_size=1,
        batch_size=config.judge.eval_batch_size,
        seed=config.run.seed,
        num_workers=0,
    )
    counts: Counter[str] = Counter()
    first = None
    generator = torch.Generator().manual_seed(config.run.seed)
    for batch in loader:
        keep = batch["valid"].bool()
        images = batch["image"][keep]
        if softened:
            images = soften(images.float() / 255.0, 1.0, generator)
        verdicts = judge_images(judge, images)
        metas = [meta for meta, ok in zip(batch["meta"], keep.tolist()) if ok]
        counts.update(count_correct(verdicts.scenes, verdicts.digits, metas))
        first = images[: config.judge.grid_images] if first is None else first
    return counts, first


def make_evaluate(config: JudgeStageConfig):
    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], torch.Tensor]:
        module = engine.module
        counts, images = heldout_counts(module, config)
        soft_counts, _ = heldout_counts(module, config, softened=True)
        module.train()
        metrics = {f"heldout_acc_{name}": value for name, value in accuracies(counts).items()}
        metrics.update({f"heldout_soft_acc_{name}": value for name, value in accuracies(soft_counts).items()})
        metrics.update(
            {f"heldout_{key}": float(value) for key, value in counts.items() if key.endswith("_n")}
        )
        return metrics, images.float() / 255.0

    return evaluate


def train(config: JudgeStageConfig) -> dict[str, Any]:
    rank, _ = init_distributed()
    torch.manual_seed(config.run.seed)
    judge = Judge(config.model)
    parts = StageParts(
        model=judge,
        loss_fn=loss_fn,
        prepare_batch=functools.partial(prepare_batch, soften_probability=config.judge.soften_probability),
        evaluate=make_evaluate(config),
    )
    summary = run_training(config, parts, stage="judge")
    if rank == 0 and summary.get("checkpoint"):
        accuracy = {
            key.removeprefix("heldout_acc_"): value
            for key, value in summary["last_eval"].items()
            if key.startswith("heldout_acc_")
        }
        summary["judge_card"] = write_card(summary["checkpoint"], config.model, accuracy, config_hash(config))
        summary["heldout_accuracy"] = accuracy
    return summary
