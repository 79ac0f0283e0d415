"""Stage 1 of DALL-E: train the discrete VAE that turns images into codebook tokens.

Loss per image (normalised per sub-pixel, so it reads like a per-pixel NLL at any resolution):
``recon + beta(step) * KL * latent_positions / (3 * H * W)``, i.e. the paper's beta-ELBO divided by the
number of image dimensions. ``beta`` ramps from 0 (cosine) over ``kl_warmup_steps``; the Gumbel-softmax
temperature anneals (cosine) from ``temperature_start`` to ``temperature_end``. Eval uses hard
(argmax) codes, as the transformer stage will: PSNR/MSE on a fixed validation batch, codebook
perplexity and the fraction of codes never used, and an input|reconstruction grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.loader import open_loader
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.engine import Engine, init_distributed
from trainer.grids import labelled_grid
from trainer.losses.vae import (
    codebook_usage,
    kl_to_uniform,
    logit_laplace_nll,
    marginal_kl_to_uniform,
    psnr,
    squared_error,
)
from trainer.models import build
from trainer.models.dvae import DVAEConfig
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training


class DVAESettings(BaseModel):
    """``[dvae]``: the ELBO's schedules (paper: beta 6.6 over 5k steps, tau 1 -> 1/16 over 150k)."""

    model_config = ConfigDict(extra="forbid")

    kl_weight: float = Field(6.6, ge=0)
    kl_warmup_steps: int = Field(5000, ge=0)
    temperature_start: float = Field(1.0, gt=0)
    temperature_end: float = Field(1 / 16, gt=0)
    temperature_anneal_steps: int = Field(150_000, ge=0)
    # Weight of KL(batch-mean code distribution || uniform), in the KL term's units (0: the paper's loss).
    usage_weight: float = Field(0.0, ge=0)
    # Start the code logits from training features (each code aimed at a random position's features).
    init_logits_from_data: bool = False
    grid_images: int = Field(8, ge=1)


class DVAEStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = RunConfig(name="dvae")
    engine: EngineConfig = EngineConfig()
    data: DataConfig
    model: DVAEConfig = DVAEConfig()
    dvae: DVAESettings = DVAESettings()

    @model_validator(mode="after")
    def _check(self) -> DVAEStageConfig:
        if self.dvae.grid_images > self.data.validation_batch_size:
            raise ValueError("dvae.grid_images must be <= data.validation_batch_size")
        return self


CONFIG = DVAEStageConfig


def cosine_anneal(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along half a cosine; ``end`` afterwards."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / steps))


def kl_weight_at(settings: DVAESettings, step: int) -> float:
    """beta(step): 0 at step 0, rising along half a cosine to ``kl_weight`` at ``kl_warmup_steps``."""
    return cosine_anneal(step, 0.0, settings.kl_weight, settings.kl_warmup_steps)


def temperature_at(settings: DVAESettings, step: int) -> float:
    """tau(step): ``temperature_start`` falling along half a cosine to ``temperature_end``."""
    return cosine_anneal(
        step, settings.temperature_start, settings.temperature_end, settings.temperature_anneal_steps
    )


def prepare_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Loader batch -> engine input: uint8 images to [0, 1] floats, plus the padding mask."""
    return {"image": batch["image"].float() / 255.0, "valid": batch["valid"]}


def masked_mean(per_sample: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over real rows only; padding rows (``valid=False``) carry no gradient."""
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def make_loss(config: DVAEStageConfig):
    settings, model_config = config.dvae, config.model
    latent_ratio = model_config.latent_size**2 / (3 * model_config.image_size**2)

    def loss_fn(model, batch, step):
        temperature = temperature_at(settings, step)
        beta = kl_weight_at(settings, step)
        images = batch["image"]
        output = model(images, temperature)
        if model_config.reconstruction == "logit_laplace":
            recon_elements = logit_laplace_nll(images, output.decoded[:, :3], output.decoded[:, 3:])
        else:
            recon_elements = squared_error(images, output.decoded)
        recon = masked_mean(recon_elements.flatten(1).mean(1), batch["valid"])
        kl = masked_mean(kl_to_uniform(output.logits).flatten(1).mean(1), batch["valid"])
        loss = recon + beta * latent_ratio * kl
        metrics = {"recon": recon, "kl": kl, "temperature": temperature, "kl_weight": beta}
        if settings.usage_weight:
            usage_kl = marginal_kl_to_uniform(output.logits, batch["valid"])
            loss = loss + settings.usage_weight * latent_ratio * usage_kl
            metrics["usage_kl"] = usage_kl
        return loss, metrics

    return loss_fn


def validation_images(config: DVAEStageConfig) -> torch.Tensor:
    """The fixed eval images (see ``fixed_validation_batch``)."""
    return prepare_batch(fixed_validation_batch(config))["image"]


def init_batch_size(config: DVAEStageConfig) -> int:
    """Images enough for >= 4 latent positions per code: what ``init_code_logits`` samples from."""
    return math.ceil(4 * config.model.vocab_size / config.model.latent_size**2)


def training_images(config: DVAEStageConfig) -> torch.Tensor:
    """The first training batch (the same on every rank) with >= 4 latent positions per code."""
    loader = open_loader(
        config.data.manifest, rank=0, world_size=1, batch_size=init_batch_size(config), seed=config.run.seed
    )
    return prepare_batch(next(iter(loader)))["image"]


def usage_metrics(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """How the codebook is used on the validation batch: perplexity, dead share, and the histogram's
    shape (share of the busiest code, how many codes cover half of all positions)."""
    perplexity, dead = codebook_usage(codes, vocab_size)
    shares = torch.bincount(codes.flatten(), minlength=vocab_size).double().sort(descending=True).values
    shares /= shares.sum()
    return {
        "codebook_perplexity": perplexity,
        "dead_code_fraction": dead,
        "top_code_share": float(shares[0]),
        "codes_for_half": float(int((shares.cumsum(0) < 0.5).sum()) + 1),
    }


def make_evaluate(config: DVAEStageConfig, images: torch.Tensor):
    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], torch.Tensor]:
        # Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 logs.
        module = engine.module
        module.eval()
        inputs = images.to(engine.device, engine.dtype)
        codes = module.encode(inputs)
        reconstruction = module.decode(codes).float().cpu()
        module.train()
        per_image_psnr = psnr(images, reconstruction)
        metrics = {
            "val_mse": float(squared_error(images, reconstruction).mean()),
            "val_psnr": float(per_image_psnr.mean()),
            **usage_metrics(codes.cpu(), config.model.vocab_size),
        }
        count = config.dvae.grid_images
        pairs = torch.stack([images[:count], reconstruction[:count]], dim=1).flatten(0, 1)  # input | recon
        scores = per_image_psnr[:count].tolist()
        labels = [text for value in scores for text in ("original", f"from codes: {value:.1f} dB")]
        return metrics, labelled_grid(pairs, labels)

    return evaluate


def train(config: DVAEStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()  # before the model: the same seed gives every rank the same initial weights
    torch.manual_seed(config.run.seed)
    model = build(config.model, device="cpu")
    if config.dvae.init_logits_from_data:
        model.init_code_logits(training_images(config))
    images = validation_images(config)
    if images.shape[-1] != config.model.image_size:
        raise ValueError(
            f"data has {images.shape[-1]} px images but model.image_size is {config.model.image_size}"
        )
    parts = StageParts(
        model=model,
        loss_fn=make_loss(config),
        prepare_batch=prepare_batch,
        evaluate=make_evaluate(config, images),
    )
    return run_training(config, parts, stage="dvae")
