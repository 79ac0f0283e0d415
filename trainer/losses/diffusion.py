"""The denoising loss: MSE to the eps or v target, optionally min-SNR-gamma weighted.

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")
weights each timestep's x0-space loss by ``min(SNR, gamma)``; expressed for the target the model
actually predicts that becomes ``min(SNR, gamma) / SNR`` for eps and ``min(SNR, gamma) / (SNR + 1)``
for v. Low-noise timesteps (huge SNR) then stop dominating the gradient.
"""

from __future__ import annotations

import torch


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample weight of the ``prediction``-space MSE under min-SNR-``gamma``."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}: use eps or v")


def diffusion_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    snr: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    prediction: str = "eps",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-sample MSE)``: the (weighted) mean over real samples of each sample's MSE.

    ``snr`` (per sample) is needed only with ``min_snr_gamma``; ``valid`` marks real rows (padding rows
    of a short last batch carry no gradient). Computed in float32 at least, whatever the model's dtype.
    """
    dtype = torch.promote_types(output.dtype, torch.float32)
    per_sample = (output.to(dtype) - target.to(dtype)).square().flatten(1).mean(1)
    weights = torch.ones_like(per_sample)
    if min_snr_gamma is not None:
        if snr is None:
            raise ValueError("min_snr_gamma needs the per-sample snr")
        weights = min_snr_weight(snr.to(dtype), min_snr_gamma, prediction)
    if valid is not None:
        weights = weights * valid.to(dtype)
        count = valid.to(dtype).sum().clamp_min(1.0)
    else:
        count = torch.tensor(float(per_sample.numel()), dtype=dtype)
    return (per_sample * weights).sum() / count, per_sample.detach()


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent elements (the VAE prior term)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
