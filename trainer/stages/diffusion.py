"""Stage ``diffusion``: a text-conditioned denoiser (UNet or DiT) in a frozen KL autoencoder's latents.

config -> loader (images + tokenized captions) -> frozen autoencoder encodes images to latents (times
its measured scale factor) -> caption dropout (the unconditional model guidance needs), a timestep and
noise per sample -> eps or v MSE (optionally min-SNR-gamma) through ``trainer.engine`` -> EMA of the
weights (inside the module, so it is checkpointed and resumed with them) -> MLflow: validation losses
of the raw and EMA weights, and a grid of EMA samples for the held-out prompts, one row per guidance
scale, with the samples' pixel statistics against the data's (as the autoencoder decodes real latents).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.tokenizer import TextTokenizer, load_tokenizer
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.diffusion.ema import WithEMA, applied_optimizer_steps
from trainer.diffusion.inference import check_compatible, generate, load_frozen_autoencoder
from trainer.diffusion.samplers import SamplerKind
from trainer.diffusion.schedule import NoiseSchedule, Prediction, ScheduleKind
from trainer.engine import Engine, init_distributed
from trainer.losses.diffusion import diffusion_loss
from trainer.models import build
from trainer.models.autoencoder import KLAutoencoder
from trainer.models.dit import DiTConfig
from trainer.models.unet import UNetConfig
from trainer.stages.dalle import default_prompts
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training

DenoiserConfig = Annotated[UNetConfig | DiTConfig, Field(discriminator="kind")]


class DiffusionSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    autoencoder_config: str = Field(
        description='the autoencoder run\'s TOML (the CLI resolves autoencoder_checkpoint "auto" with it)'
    )
    autoencoder_checkpoint: str = Field(
        "auto", description='a checkpoint URL, or "auto" (resolved by the CLI)'
    )
    schedule: ScheduleKind = "scaled_linear"
    num_timesteps: int = Field(1000, ge=2)
    prediction: Prediction = "eps"
    min_snr_gamma: float | None = Field(None, gt=0, description="Hang et al. 2023 use 5")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by padding")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = True
    guidance_scales: list[float] = Field(default_factory=lambda: [1.0, 3.0], min_length=1)
    sampler: SamplerKind = "ddim"
    sample_steps: int = Field(25, ge=1)
    sample_prompts: list[str] = Field(
        default_factory=list, description="default: the manifest's held-out ones"
    )
    samples_per_scale: int = Field(8, ge=1)
    sample_seed: int = 0


class DiffusionStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="diffusion"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig
    model: DenoiserConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionSection

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionStageConfig:
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer is required: the diffusion stage reads captions")
        if self.data.text_len != self.model.text.text_len:
            raise ValueError(
                f"data.text_len ({self.data.text_len}) != model.text.text_len ({self.model.text.text_len})"
            )
        if self.engine.zero_stage == 3:
            raise ValueError(
                "engine.zero_stage 3 partitions parameters, so no rank could average the whole model: "
                "the EMA needs zero_stage 0, 1 or 2"
            )
        if self.diffusion.sample_steps > self.diffusion.num_timesteps:
            raise ValueError("diffusion.sample_steps must be <= diffusion.num_timesteps")
        return self


CONFIG = DiffusionStageConfig


def make_prepare_batch(
    autoencoder: KLAutoencoder, schedule: NoiseSchedule, pad_id: int, caption_dropout: float
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """Loader batch -> engine input: scaled latents, captions (some dropped), timesteps and noise.

    The draws come from the global torch RNG, which checkpoints save per rank, so resume is exact.
    """
    device = next(autoencoder.parameters()).device

    def prepare_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
        images = batch["image"].to(device).float() / 255.0
        latents = autoencoder.encode(images).float().cpu()
        text = batch["text"].clone()
        if caption_dropout > 0:
            text[torch.rand(text.shape[0]) < caption_dropout] = pad_id
        t = torch.randint(0, schedule.num_steps, (latents.shape[0],))
        noise = torch.randn_like(latents)
        return {"latents": latents, "text": text, "t": t, "noise": noise, "valid": batch["valid"]}

    return prepare_batch


def make_denoising_loss(section: DiffusionSection, schedule: NoiseSchedule):
    """``(net, batch) -> (loss, metrics)``: the output at ``add_noise(latents, noise, t)`` vs eps or v."""

    def denoising_loss(net, batch):
        latents, noise, t = batch["latents"], batch["noise"], batch["t"]
        output = net(schedule.add_noise(latents, noise, t), t, batch["text"])
        target = noise if section.prediction == "eps" else schedule.velocity(latents, noise, t)
        loss, per_sample = diffusion_loss(
            output,
            target,
            snr=schedule.snr(t),
            min_snr_gamma=section.min_snr_gamma,
            prediction=section.prediction,
            valid=batch.get("valid"),
        )
        return loss, {"mse": per_sample.mean()}

    return denoising_loss


def make_loss_fn(section: DiffusionSection, schedule: NoiseSchedule):
    """The engine's loss. It first folds the previous optimizer step into the EMA: the Engine has no
    after-step hook, and the DeepSpeed engine's applied-step counter (checkpointed with it) says
    whether a new step happened, so skipped steps are not averaged twice and resume lines up."""
    denoising_loss = make_denoising_loss(section, schedule)

    def loss_fn(model, batch, step):
        module: WithEMA = model.module
        module.ema.follow(module.net, applied_optimizer_steps(model))
        return denoising_loss(model, batch)

    return loss_fn


def sample_prompts(config: DiffusionStageConfig) -> list[str]:
    """``samples_per_scale`` prompts (held-out ones by default), cycled to fill a grid row."""
    prompts = config.diffusion.sample_prompts or default_prompts(config)
    count = config.diffusion.samples_per_scale
    return [prompts[i % len(prompts)] for i in range(count)]


def pixel_stat_gap(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Mean over RGB of |mean gap| + |std gap| of samples vs data: 0 when the colour statistics agree."""
    gap = (samples.mean((0, 2, 3)) - data.mean((0, 2, 3))).abs() + (
        samples.std((0, 2, 3)) - data.std((0, 2, 3))
    ).abs()
    return float(gap.mean())


def make_evaluate(
    config: DiffusionStageConfig,
    autoencoder: KLAutoencoder,
    tokenizer: TextTokenizer,
    schedule: NoiseSchedule,
    validation: Mapping[str, Any],
) -> Callable[[Engine, int], tuple[dict[str, float], torch.Tensor]]:
    """Every rank runs it; draws nothing from the training RNG (own generators), so it is repeatable."""
    section = config.diffusion
    denoising_loss = make_denoising_loss(section, schedule)
    tokens = tokenizer.encode_batch(sample_prompts(config), config.model.text.text_len)
    images = validation["image"].float() / 255.0
    generator = torch.Generator().manual_seed(section.sample_seed)
    fixed = {
        "latents": autoencoder.encode(images.to(next(autoencoder.parameters()).device)).float().cpu(),
        "text": validation["text"],
        "valid": validation["valid"],
    }
    # What a perfect denoiser would give through this autoencoder: the decodes of real latents. Sample
    # statistics are compared with these, so the metric measures the denoiser, not the autoencoder.
    reference = autoencoder.decode(fixed["latents"].to(next(autoencoder.parameters()).device)).float().cpu()
    fixed["t"] = torch.randint(0, schedule.num_steps, (images.shape[0],), generator=generator)
    fixed["noise"] = torch.randn(fixed["latents"].shape, generator=generator)

    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], torch.Tensor]:
        module: WithEMA = engine.module
        module.ema.follow(module.net, applied_optimizer_steps(engine.ds))
        module.eval()
        batch = {
            key: value.to(engine.device, engine.dtype if value.is_floating_point() else value.dtype)
            for key, value in fixed.items()
        }
        metrics: dict[str, float] = {}
        rows = []
        with torch.no_grad():
            metrics["val_loss"] = float(denoising_loss(module.net, batch)[0])
            with module.ema.swapped_into(module.net) as net:
                metrics["val_loss_ema"] = float(denoising_loss(net, batch)[0])
                for scale in section.guidance_scales:
                    drawn = generate(
                        net,
                        autoencoder,
                        tokens,
                        schedule,
                        guidance=scale,
                        sampler=section.sampler,
                        steps=section.sample_steps,
                        prediction=section.prediction,
                        seed=section.sample_seed,
                        dtype=engine.dtype,
                    )
                    metrics[f"sample_pixel_gap_w{scale:g}"] = pixel_stat_gap(drawn, reference)
                    rows.append(drawn)
        module.train()
        return metrics, torch.cat(rows)  # one row per guidance scale

    return evaluate


def train(config: DiffusionStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()  # before the model: the same seed gives every rank the same initial weights
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    )
    section = config.diffusion
    autoencoder = load_frozen_autoencoder(section.autoencoder_checkpoint, device)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_compatible(config.model, autoencoder, tokenizer)
    schedule = NoiseSchedule(section.schedule, section.num_timesteps)
    torch.manual_seed(config.run.seed)
    net = build(config.model, device="cpu")
    model = WithEMA(net, section.ema_decay, section.ema_warmup)
    parts = StageParts(
        model=model,
        loss_fn=make_loss_fn(section, schedule),
        prepare_batch=make_prepare_batch(
            autoencoder, schedule, config.model.text.pad_id, section.caption_dropout
        ),
        evaluate=make_evaluate(
            config,
            autoencoder,
            tokenizer,
            schedule,
            fixed_validation_batch(config, tokenizer=tokenizer, text_len=config.data.text_len),
        ),
        flops_per_sample=net.flops_per_sample(),
    )
    return run_training(config, parts, stage="diffusion")
