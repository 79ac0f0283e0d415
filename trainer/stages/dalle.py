"""Stage ``dalle``: train the text+image transformer on a frozen dVAE's codes.

config -> loader (images + tokenized captions) -> frozen dVAE encodes images to codes on the fly
-> caption dropout (so classifier-free guidance has an unconditional model) -> weighted CE
(+ MoE load-balancing loss) through ``trainer.engine`` -> checkpoints -> MLflow metrics and, every
``sample_every`` steps and at the end, an image grid drawn for held-out prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.manifest import load_manifest
from data_pipeline.tokenizer import TextTokenizer, load_tokenizer
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.engine import Engine, init_distributed
from trainer.grids import labelled_grid
from trainer.inference import load_frozen_dvae
from trainer.losses.dalle import dalle_loss
from trainer.models import build
from trainer.models.dalle import DalleConfig, DalleTransformer, remap_text_padding
from trainer.models.dvae import DVAE
from trainer.sampling import SamplingConfig, generate_codes
from trainer.stages.loop import StageParts, fixed_validation_batch, run_training


class DalleSection(BaseModel):
    """What this stage adds on top of the shared sections."""

    model_config = ConfigDict(extra="forbid")

    dvae_config: str = Field(
        description='the dVAE run\'s TOML: the CLI finds its newest checkpoint when dvae_checkpoint is "auto"'
    )
    dvae_checkpoint: str = Field(
        "auto",
        description='a dVAE checkpoint URL (it carries its model config), or "auto": the newest one of '
        "the dvae_config run, resolved by the CLI before the stage starts",
    )
    text_weight: float = Field(1 / 8, ge=0)
    image_weight: float = Field(7 / 8, ge=0)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by padding")
    sample_prompts: list[str] = Field(
        default_factory=list, description="captions to draw; default: ones naming held-out combinations"
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class DalleStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="dalle"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig
    model: DalleConfig = Field(default_factory=DalleConfig)
    dalle: DalleSection

    @model_validator(mode="after")
    def _consistent(self) -> DalleStageConfig:
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer is required: the dalle stage reads captions")
        if self.data.text_len != self.model.text_len:
            raise ValueError(
                f"data.text_len ({self.data.text_len}) must equal model.text_len ({self.model.text_len})"
            )
        if self.model.moe.enabled and self.engine.zero_stage == 3:
            raise ValueError(
                "model.moe.enabled needs engine.zero_stage 0, 1 or 2: DeepSpeed's native MoE refuses ZeRO-3"
            )
        return self


def make_loss_fn(
    config: DalleConfig, *, text_weight: float = 1 / 8, image_weight: float = 7 / 8
) -> Callable[[Any, Mapping[str, Any], int], tuple[torch.Tensor, dict[str, float]]]:
    """The engine's ``loss_fn`` for batches ``{"text": (B, text_len), "codes": (B, image_side**2)}``.

    Returns the weighted CE plus ``moe.aux_loss_weight`` times the load-balancing loss, and each
    part as a metric.
    """

    def loss_fn(model: Any, batch: Mapping[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        text, codes = batch["text"], batch["codes"]
        out = model(text, codes[:, :-1])
        text_targets = remap_text_padding(text, config.text_pad_id, config.text_vocab_size)[:, 1:]
        loss, text_loss, image_loss = dalle_loss(
            out.text_logits,
            text_targets,
            out.image_logits,
            codes,
            text_weight,
            image_weight,
            batch.get("valid"),
        )
        metrics = {"text_loss": float(text_loss.detach()), "image_loss": float(image_loss.detach())}
        if config.moe.enabled:
            loss = loss + config.moe.aux_loss_weight * out.aux_loss
            metrics["moe_aux_loss"] = float(out.aux_loss.detach())
        return loss, metrics

    return loss_fn


CONFIG = DalleStageConfig


def default_prompts(config: DalleStageConfig) -> list[str]:
    """The held-out prompts the dataset's source recorded in its manifest (``source_info``).

    For synthetic scenes these name the colour/shape pairs the training split never shows.
    """
    prompts = load_manifest(config.data.manifest).source_info.get("heldout_prompts")
    if not prompts:
        raise ValueError(
            f"{config.data.manifest}: the manifest records no source_info.heldout_prompts; "
            "set dalle.sample_prompts"
        )
    return list(prompts)


def check_compatible(config: DalleStageConfig, dvae: DVAE, tokenizer: TextTokenizer) -> None:
    """The transformer's vocabularies and grid must be the ones the dVAE and tokenizer produce."""
    model, problems = config.model, []
    if dvae.config.latent_size != model.image_side:
        problems.append(
            f"model.image_side {model.image_side} != the dVAE's latent side {dvae.config.latent_size}"
        )
    if dvae.config.vocab_size != model.image_vocab_size:
        problems.append(
            f"model.image_vocab_size {model.image_vocab_size} != the dVAE's {dvae.config.vocab_size} codes"
        )
    if tokenizer.vocab_size > model.text_vocab_size:
        problems.append(
            f"model.text_vocab_size {model.text_vocab_size} < the tokenizer's {tokenizer.vocab_size}"
        )
    if tokenizer.pad_id != model.text_pad_id:
        problems.append(f"model.text_pad_id {model.text_pad_id} != the tokenizer's pad id {tokenizer.pad_id}")
    if problems:
        raise ValueError("dalle config does not fit its inputs:\n  " + "\n  ".join(problems))


def make_prepare_batch(
    dvae: DVAE, pad_id: int, caption_dropout: float
) -> Callable[[Mapping[str, Any]], dict]:
    """Loader batch -> engine input: dVAE codes of the images, captions with some dropped to padding.

    The dropout draws from the global torch RNG, which checkpoints save per rank, so resume is exact;
    without dropout (evaluation) nothing is drawn.
    """
    device = next(dvae.parameters()).device

    def prepare_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
        images = batch["image"].to(device).float() / 255.0
        codes = dvae.encode(images).flatten(1).cpu()
        text = batch["text"].clone()
        if caption_dropout > 0:
            text[torch.rand(text.shape[0]) < caption_dropout] = pad_id
        return {"text": text, "codes": codes, "valid": batch["valid"]}

    return prepare_batch


def make_evaluate(
    config: DalleStageConfig, dvae: DVAE, tokenizer: TextTokenizer, validation: Mapping[str, Any]
) -> Callable[[Engine, int], tuple[dict[str, float], torch.Tensor]]:
    """Validation losses on a fixed batch, and images drawn for the sample prompts (every rank runs it).

    Draws nothing from the training RNG: no caption dropout, and sampling seeds its own generator
    (``dalle.sampling.seed``), so the same weights give the same metrics and images on every run.
    """
    section = config.dalle
    loss_fn = make_loss_fn(config.model, text_weight=section.text_weight, image_weight=section.image_weight)
    prompt_texts = section.sample_prompts or default_prompts(config)
    prompts = tokenizer.encode_batch(prompt_texts, config.model.text_len)
    side = config.model.image_side

    def evaluate(engine: Engine, step: int) -> tuple[dict[str, float], torch.Tensor]:
        module = engine.module
        module.eval()
        with torch.no_grad():
            batch = make_prepare_batch(dvae, config.model.text_pad_id, 0.0)(validation)
            batch = {key: value.to(engine.device) for key, value in batch.items()}
            loss, parts = loss_fn(module, batch, step)
        codes = generate_codes(module, prompts.to(engine.device), section.sampling)
        images = dvae.decode(codes.view(-1, side, side).to(next(dvae.parameters()).device)).float().cpu()
        module.train()
        metrics = {"val_loss": float(loss), **{f"val_{name}": value for name, value in parts.items()}}
        return metrics, labelled_grid(images, prompt_texts)  # each sample enlarged, its prompt under it

    return evaluate


def train(config: DalleStageConfig) -> dict[str, Any]:
    """Entry point for every launch mode (see cluster.launch)."""
    init_distributed()  # before the model: the same seed gives every rank the same initial weights
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    )
    dvae = load_frozen_dvae(config.dalle.dvae_checkpoint, device or torch.device("cpu"))
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_compatible(config, dvae, tokenizer)
    torch.manual_seed(config.run.seed)
    model: DalleTransformer = build(config.model, device="cpu")
    section = config.dalle
    parts = StageParts(
        model=model,
        loss_fn=make_loss_fn(
            config.model, text_weight=section.text_weight, image_weight=section.image_weight
        ),
        prepare_batch=make_prepare_batch(dvae, config.model.text_pad_id, section.caption_dropout),
        evaluate=make_evaluate(
            config,
            dvae,
            tokenizer,
            fixed_validation_batch(config, tokenizer=tokenizer, text_len=config.data.text_len),
        ),
        tokens_per_sample=config.model.seq_len,
    )
    return run_training(config, parts, stage="dalle")
