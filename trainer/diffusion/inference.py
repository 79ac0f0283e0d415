"""Latent diffusion out of checkpoints: the frozen autoencoder, the denoiser (EMA weights by default)
and prompt -> image generation with classifier-free guidance. No engine, no training loop.

Checkpoints carry their model config (``model.json``), so loading needs only the URL.
"""

from __future__ import annotations

import torch
from pydantic import TypeAdapter

from data_pipeline.tokenizer import TextTokenizer
from trainer.checkpoint import read_model_config, read_module_state
from trainer.diffusion.ema import buffer_key
from trainer.diffusion.samplers import SamplerKind, guided, sample
from trainer.diffusion.schedule import NoiseSchedule, Prediction
from trainer.models import build
from trainer.models.autoencoder import AutoencoderConfig, KLAutoencoder
from trainer.models.dit import DiTConfig
from trainer.models.text_encoder import TextConditioned
from trainer.models.unet import UNetConfig

DENOISER_CONFIG: TypeAdapter = TypeAdapter(UNetConfig | DiTConfig)


def load_frozen_autoencoder(checkpoint: str, device: torch.device | str = "cpu") -> KLAutoencoder:
    """The autoencoder of a checkpoint (with its measured ``scale_factor``), eval mode, no gradients."""
    model = build(AutoencoderConfig.model_validate(read_model_config(checkpoint)), device="cpu")
    model.load_state_dict(read_module_state(checkpoint))
    return model.eval().requires_grad_(False).to(device)


def load_denoiser(
    checkpoint: str, device: torch.device | str = "cpu", *, ema: bool = True
) -> TextConditioned:
    """The denoiser (UNet or DiT, per the checkpoint's config) with its EMA or its raw weights."""
    net = build(DENOISER_CONFIG.validate_python(read_model_config(checkpoint)), device="cpu")
    state = read_module_state(checkpoint)
    if ema:
        weights = {name: state[f"ema.{buffer_key(name)}"] for name, _ in net.named_parameters()}
    else:
        weights = {
            name.removeprefix("net."): value for name, value in state.items() if name.startswith("net.")
        }
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def generate(
    net: TextConditioned,
    autoencoder: KLAutoencoder,
    tokens: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    guidance: float,
    sampler: SamplerKind = "ddim",
    steps: int = 50,
    prediction: Prediction = "eps",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for token rows ``tokens`` (N, text_len).

    The initial noise (and DDPM's per-step noise) comes from a generator seeded with ``seed``, so the
    same weights draw the same images, and nothing is taken from the global (training) RNG.
    """
    device = next(net.parameters()).device
    config = net.config
    context = net.text(tokens.to(device))
    null_context = net.text(net.text.null_tokens(device))
    generator = torch.Generator().manual_seed(seed)
    shape = (tokens.shape[0], config.latent_channels, config.latent_size, config.latent_size)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    denoise = guided(net.denoise, context, null_context, guidance)
    latents = sample(
        lambda x, t: denoise(x.to(device, dtype), t.to(device)).cpu(),
        schedule,
        noise,
        sampler=sampler,
        steps=steps,
        prediction=prediction,
        generator=generator,
    )
    autoencoder_device = next(autoencoder.parameters()).device
    images = autoencoder.decode(latents.to(autoencoder_device, next(autoencoder.parameters()).dtype))
    return images.float().cpu()


def check_compatible(
    net_config: UNetConfig | DiTConfig, autoencoder: KLAutoencoder, tokenizer: TextTokenizer
) -> None:
    """The denoiser's latent shape and text vocabulary must be the autoencoder's and tokenizer's."""
    problems = []
    ae = autoencoder.config
    if (net_config.latent_channels, net_config.latent_size) != (ae.latent_channels, ae.latent_size):
        problems.append(
            f"model latents {net_config.latent_channels}x{net_config.latent_size}^2 != the autoencoder's "
            f"{ae.latent_channels}x{ae.latent_size}^2"
        )
    if tokenizer.vocab_size > net_config.text.vocab_size:
        problems.append(
            f"model.text.vocab_size {net_config.text.vocab_size} < the tokenizer's {tokenizer.vocab_size}"
        )
    if tokenizer.pad_id != net_config.text.pad_id:
        problems.append(
            f"model.text.pad_id {net_config.text.pad_id} != the tokenizer's pad id {tokenizer.pad_id}"
        )
    if problems:
        raise ValueError("diffusion config does not fit its inputs:\n  " + "\n  ".join(problems))
