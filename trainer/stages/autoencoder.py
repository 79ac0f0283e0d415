"""Stage ``autoencoder``: the KL autoencoder latent diffusion runs in.

Loss per image: mean L1 or L2 reconstruction error per sub-pixel + ``kl_weight`` x the KL summed over
latent elements / (3 H W) — LDM's per-image sums (kl_weight ~1e-6) divided by the pixel count, so the
numbers read per sub-pixel. Every evaluation also measures the latent scale factor, 1 / std of the
posterior means of ``scale_batch`` training images, and stores it in the model's ``scale_factor``
buffer, i.e. in the checkpoint beside the weights, where the diffusion stage reads it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.loader import open_loader
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.engine import Engine, init_distributed
from trainer.losses.diffusion import gaussian_kl
from trainer.losses.vae import psnr, squared_error
from trainer.models import build
from trainer.models.autoencoder import AutoencoderConfig, KLAutoencoder
from trainer.stages.dvae import masked_mean, prepare_batch
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training


class AutoencoderSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kl_weight: float = Field(1e-6, ge=0, description="LDM's KL weight on per-image sums")
    reconstruction: Literal["l1", "l2"] = "l1"
    scale_batch: int = Field(64, ge=2, description="training images the latent std is measured on")
    grid_images: int = Field(8, ge=1)


class AutoencoderStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="autoencoder"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig
    model: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    autoencoder: AutoencoderSection = Field(default_factory=AutoencoderSection)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderStageConfig:
        if self.autoencoder.grid_images > self.data.validation_batch_size:
            raise ValueError("autoencoder.grid_images must be <= data.validation_batch_size")
        return self


CONFIG = AutoencoderStageConfig


def make_loss(config: AutoencoderStageConfig):
    section = config.autoencoder
    pixels = 3 * config.model.image_size**2

    def loss_fn(model, batch, step):
        images = batch["image"]
        output = model(images)
        error = (output.reconstruction - images).float()
        error = error.abs() if section.reconstruction == "l1" else error.square()
        recon = masked_mean(error.flatten(1).mean(1), batch["valid"])
        kl = masked_mean(gaussian_kl(output.mean.float(), output.logvar.float()), batch["valid"])
        return recon + section.kl_weight * kl / pixels, {"recon": recon, "kl": kl}

    return loss_fn


@torch.no_grad()
def measure_scale_factor(model: KLAutoencoder, images: torch.Tensor) -> float:
    """1 / std of the posterior means over ``images`` (LDM: unit-variance latents for the diffusion)."""
    return 1.0 / float(model.posterior(images)[0].float().std())


def make_evaluate(config: AutoencoderStageConfig, validation: torch.Tensor, scale_images: torch.Tensor):
    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], torch.Tensor]:
        module: KLAutoencoder = engine.module
        module.eval()
        with torch.no_grad():
            scale = measure_scale_factor(module, scale_images.to(engine.device, engine.dtype))
            module.scale_factor.fill_(scale)  # saved with the weights at the next checkpoint
            inputs = validation.to(engine.device, engine.dtype)
            reconstruction = module.decode(module.encode(inputs)).float().cpu()
        module.train()
        metrics = {
            "val_mse": float(squared_error(validation, reconstruction).mean()),
            "val_psnr": float(psnr(validation, reconstruction).mean()),
            "latent_scale_factor": scale,
        }
        count = config.autoencoder.grid_images
        grid = torch.stack([validation[:count], reconstruction[:count]], dim=1).flatten(0, 1)
        return metrics, grid

    return evaluate


def scale_images(config: AutoencoderStageConfig) -> torch.Tensor:
    """The first ``scale_batch`` TRAINING images (the latents the diffusion model will see)."""
    loader = open_loader(
        config.data.manifest,
        rank=0,
        world_size=1,
        batch_size=config.autoencoder.scale_batch,
        seed=config.run.seed,
        num_workers=0,
    )
    batch = prepare_batch(next(iter(loader)))
    return batch["image"][batch["valid"]]


def train(config: AutoencoderStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()  # before the model: the same seed gives every rank the same initial weights
    torch.manual_seed(config.run.seed)
    model = build(config.model, device="cpu")
    validation = prepare_batch(fixed_validation_batch(config))["image"]
    if validation.shape[-1] != config.model.image_size:
        raise ValueError(
            f"data has {validation.shape[-1]} px images but model.image_size is {config.model.image_size}"
        )
    parts = StageParts(
        model=model,
        loss_fn=make_loss(config),
        prepare_batch=prepare_batch,
        evaluate=make_evaluate(config, validation, scale_images(config)),
        flops_per_sample=model.flops_per_sample(),
    )
    return run_training(config, parts, stage="autoencoder")
