"""dVAE ELBO terms and the metrics that watch a dVAE train, as pure functions of tensors.

Reconstruction terms return one value per element and the KL one per latent position, so the
stage decides how to weight and mask them (padding rows, the ELBO's sum-over-dimensions ratio).
The logit-Laplace likelihood follows DALL-E (Ramesh et al. 2021, sec. A.3): pixels are squeezed into
``[eps, 1 - eps]`` so the density's support (0, 1) never hits its poles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(images: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """``[0, 1] -> [eps, 1 - eps]``: where the logit-Laplace density lives."""
    return (1 - 2 * eps) * images + eps


def unmap_pixels(mapped: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return ((mapped - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(
    images: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS
) -> torch.Tensor:
    """Per-element negative log-density of ``images`` (in [0, 1]) under logit-Laplace(mu, exp(log_scale)).

    ``p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y))`` with ``y = map_pixels(images)``.
    """
    y = map_pixels(images.float(), eps)
    mu, log_scale = mu.float(), log_scale.float()
    return (
        math.log(2.0)
        + log_scale
        + torch.log(y)
        + torch.log1p(-y)
        + (torch.logit(y) - mu).abs() * torch.exp(-log_scale)
    )


def squared_error(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-element squared error (the MSE reconstruction term, a Gaussian NLL up to constants)."""
    return (images.float() - reconstruction.float()) ** 2


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(softmax(logits) || uniform over the codebook), one value per latent position (nats)."""
    log_q = F.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])


def marginal_kl_to_uniform(
    logits: torch.Tensor, valid: torch.Tensor | None = None, dim: int = 1
) -> torch.Tensor:
    """KL(q_bar || uniform), q_bar = softmax(logits) averaged over every latent position of the batch.

    The ELBO's mean KL splits into I(x; z) + KL(q_bar || uniform): this is the second part alone, so
    weighting it penalises a batch that piles onto a few codes without penalising informative codes
    (the codebook-diversity term of wav2vec 2.0 / the batch-entropy term of MAGVIT-v2's LFQ).
    ``valid`` (B,) leaves padding rows out.
    """
    probs = F.softmax(logits.float(), dim=dim).movedim(dim, -1)
    if valid is not None:
        probs = probs[valid.bool()]
    q_bar = probs.reshape(-1, probs.shape[-1]).mean(0)
    return (q_bar * q_bar.clamp_min(1e-30).log()).sum() + math.log(q_bar.numel())


def psnr(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1]."""
    mse = squared_error(images, reconstruction).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """``(perplexity, dead_fraction)`` of the code histogram: how many entries are effectively used."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(entropy.exp()), float((counts == 0).double().mean())
