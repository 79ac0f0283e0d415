"""Trained models out of checkpoints, for sampling, evals and RLHF: no DeepSpeed engine, no training loop.

A checkpoint carries its own model config (``model.json``), so loading needs only its URL; callers
that start from a run's config resolve ``"auto"`` to that run's newest checkpoint with
:func:`resolve_checkpoint` first.
"""

from __future__ import annotations

import logging

import torch

from data_pipeline.tokenizer import TextTokenizer
from trainer.checkpoint import list_checkpoints, read_marker, read_model_config, read_module_state
from trainer.models import build
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.models.dvae import DVAE, DVAEConfig
from trainer.sampling import SamplingConfig, generate_codes

log = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str, root: str) -> str:
    """``checkpoint`` itself, or for ``"auto"`` the newest complete checkpoint under ``root``."""
    if checkpoint != "auto":
        return checkpoint
    complete = list_checkpoints(root)
    if not complete:
        raise FileNotFoundError(f"no complete checkpoint under {root}: train first or name one")
    return complete[-1].url


def checkpoint_or_newest(url: str) -> str:
    """``url`` when it is a complete checkpoint; else a run's checkpoint folder, meaning its newest one.

    Lets configs name the run whose output they consume (``runs/dalle-tiny/checkpoints``) without
    knowing the step it stopped at.
    """
    return url if read_marker(url) is not None else resolve_checkpoint("auto", url)


def _require_url(checkpoint: str, what: str) -> None:
    if checkpoint == "auto":
        raise ValueError(
            f'{what} "auto" must be resolved to a checkpoint URL first (resolve_checkpoint; '
            "the tessera CLI does it from the run's config)"
        )


def load_frozen_dvae(checkpoint: str, device: torch.device | str = "cpu") -> DVAE:
    """The dVAE of a checkpoint, in eval mode and without gradients (the codes' fixed encoder)."""
    _require_url(checkpoint, "dVAE checkpoint")
    model = build(DVAEConfig.model_validate(read_model_config(checkpoint)), device="cpu")
    model.load_state_dict(read_module_state(checkpoint))
    return model.eval().requires_grad_(False).to(device)


def load_trained(checkpoint: str, device: torch.device | str = "cpu") -> DalleTransformer:
    """The DALL-E transformer of a checkpoint, in eval mode.

    MoE layers are rebuilt with every expert local (``ep_size=1``): the checkpoint stores each expert
    under its global index, so one process holds the whole model.
    """
    _require_url(checkpoint, "checkpoint")
    config = DalleConfig.model_validate(read_model_config(checkpoint))
    config = config.model_copy(update={"moe": config.moe.model_copy(update={"ep_size": 1})})
    model = build(config, device="cpu")
    model.load_state_dict(read_module_state(checkpoint))
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def draw_samples(
    model: DalleTransformer,
    dvae: DVAE,
    tokenizer: TextTokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [0, 1] and codes (N, image_side**2) for ``prompts``."""
    device = next(model.parameters()).device
    text = tokenizer.encode_batch(prompts, model.config.text_len).to(device)
    codes = generate_codes(model, text, sampling)
    side = model.config.image_side
    images = dvae.decode(codes.view(-1, side, side).to(next(dvae.parameters()).device))
    return images.float().cpu(), codes.cpu()
