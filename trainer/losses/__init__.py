"""Every loss as a pure function of tensors; one module per family, re-exported here."""

from trainer.losses.dalle import dalle_loss
from trainer.losses.rlhf import bradley_terry_loss, dpo_loss, gae, kl_penalty, ppo_policy_loss, value_loss
from trainer.losses.vae import (
    codebook_usage,
    kl_to_uniform,
    logit_laplace_nll,
    map_pixels,
    psnr,
    squared_error,
    unmap_pixels,
)

__all__ = [
    "bradley_terry_loss",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "ppo_policy_loss",
    "value_loss",
    "codebook_usage",
    "dalle_loss",
    "kl_to_uniform",
    "logit_laplace_nll",
    "map_pixels",
    "psnr",
    "squared_error",
    "unmap_pixels",
]
