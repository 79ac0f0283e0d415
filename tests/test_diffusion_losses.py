"""The denoising loss against float64 references derived in x0 space, as Hang et al. define min-SNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.losses.diffusion import diffusion_loss

rng = np.random.default_rng(0)


def random_case(n: int = 32):
    """Fresh x0, noise, a model output and per-sample noise levels (alpha-bar spread over (0, 1))."""
    x0 = rng.standard_normal((n, 4, 3, 3))
    noise = rng.standard_normal((n, 4, 3, 3))
    output = rng.standard_normal((n, 4, 3, 3))
    alpha_bar = np.concatenate([rng.uniform(1e-3, 0.999, n - 2), [0.9999, 0.002]])
    return x0, noise, output, alpha_bar


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_min_snr_weighted_x0_error(prediction, gamma):
    """Reference: min(SNR, gamma) * |x0 - x0_hat|^2 (Hang et al. eq. 8), with x0_hat recovered from the
    output through the parameterisation; gamma=None is the plain MSE of the prediction target."""
    x0, noise, output, alpha_bar = random_case()
    a = np.sqrt(alpha_bar)[:, None, None, None]
    sigma = np.sqrt(1 - alpha_bar)[:, None, None, None]
    x_t = a * x0 + sigma * noise
    if prediction == "eps":
        target = noise
        x0_hat = (x_t - sigma * output) / a
    else:
        target = a * noise - sigma * x0
        x0_hat = a * x_t - sigma * output
    snr = alpha_bar / (1 - alpha_bar)
    if gamma is None:
        per_sample = ((output - target) ** 2).reshape(len(snr), -1).mean(1)
    else:
        per_sample = np.minimum(snr, gamma) * ((x0_hat - x0) ** 2).reshape(len(snr), -1).mean(1)
    loss, _ = diffusion_loss(
        torch.from_numpy(output),
        torch.from_numpy(target),
        snr=torch.from_numpy(snr),
        min_snr_gamma=gamma,
        prediction=prediction,
    )
    assert loss.dtype == torch.float64
    # Same quantity through different algebra (x0 space vs target space); float64 round-off is ~1e-15
    # relative, amplified by 1/alpha at alpha-bar=0.002: 1e-10 is ample and far below any wrong weight.
    assert float(loss) == pytest.approx(per_sample.mean(), rel=1e-10)


def test_padding_rows_are_left_out_and_low_precision_is_upcast():
    x0, noise, output, _ = random_case(8)
    valid = torch.tensor([True] * 6 + [False] * 2)
    out, target = torch.from_numpy(output), torch.from_numpy(noise)
    loss, per_sample = diffusion_loss(out, target, valid=valid)
    expected = ((output[:6] - noise[:6]) ** 2).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert per_sample.shape == (8,)
    half, _ = diffusion_loss(out.bfloat16(), target.bfloat16(), valid=valid)
    assert half.dtype == torch.float32  # bf16 inputs, fp32 reduction
    # bf16 keeps 8 bits of mantissa: the inputs are rounded by <= 2^-9 relative, the loss by ~1e-2.
    assert float(half) == pytest.approx(expected, rel=2e-2)
    with pytest.raises(ValueError, match="snr"):
        diffusion_loss(out, target, min_snr_gamma=5.0)
