"""dVAE loss terms and metrics against float64 references on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from trainer.losses.vae import (
    LOGIT_LAPLACE_EPS,
    codebook_usage,
    kl_to_uniform,
    logit_laplace_nll,
    map_pixels,
    psnr,
    squared_error,
    unmap_pixels,
)


def test_logit_laplace_nll_matches_float64_density():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 5, 5, generator=generator)
    mu = torch.randn(2, 3, 5, 5, generator=generator)
    log_scale = torch.randn(2, 3, 5, 5, generator=generator) * 0.5
    x = images.double().numpy()
    y = (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS
    b = np.exp(log_scale.double().numpy())
    density = np.exp(-np.abs(np.log(y / (1 - y)) - mu.double().numpy()) / b) / (2 * b * y * (1 - y))
    # float32 evaluation of O(1..10) terms: ~1e-6 relative error per term, a few terms summed.
    torch.testing.assert_close(
        logit_laplace_nll(images, mu, log_scale).double(),
        torch.from_numpy(-np.log(density)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_logit_laplace_density_integrates_to_one():
    # Change of variables y = map(x): the density in x is (1 - 2 eps) * p(y); integrate over x in [0, 1].
    x = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    nll = logit_laplace_nll(x, torch.tensor(0.3), torch.tensor(-1.0)).double()
    mass = torch.trapezoid(torch.exp(-nll) * (1 - 2 * LOGIT_LAPLACE_EPS), x)
    # The logit-Laplace mass outside [eps, 1 - eps] is cut off by the squeeze: it is < 1 by exactly that tail.
    y_lo, y_hi = LOGIT_LAPLACE_EPS, 1 - LOGIT_LAPLACE_EPS
    cdf = lambda y: torch.distributions.Laplace(0.3, math.exp(-1.0)).cdf(torch.logit(torch.tensor(y)))
    assert float(mass) == pytest.approx(float(cdf(y_hi) - cdf(y_lo)), abs=1e-4)


def test_kl_to_uniform_matches_torch_distributions():
    logits = torch.randn(3, 11, 4, 4, dtype=torch.float64) * 3
    q = Categorical(logits=logits.movedim(1, -1))
    uniform = Categorical(logits=torch.zeros_like(logits.movedim(1, -1)))
    # The function computes in float32: agreement to float32 rounding of values ~log(11).
    torch.testing.assert_close(
        kl_to_uniform(logits).double(), kl_divergence(q, uniform), rtol=1e-5, atol=1e-6
    )
    assert torch.all(kl_to_uniform(torch.zeros(2, 7, 3)).abs() < 1e-6)


def test_squared_error_and_psnr():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(4, 3, 8, 8, generator=generator), torch.rand(4, 3, 8, 8, generator=generator)
    mse = ((a.double() - b.double()) ** 2).reshape(4, -1).mean(1)
    torch.testing.assert_close(
        squared_error(a, b).double(), (a.double() - b.double()) ** 2, rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(psnr(a, b).double(), -10 * torch.log10(mse), rtol=1e-5, atol=1e-5)


def test_map_unmap_roundtrip():
    x = torch.rand(100)
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert map_pixels(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.1, 0.9])


def test_codebook_usage_against_numpy():
    codes = torch.randint(0, 5, (3, 4, 4), generator=torch.Generator().manual_seed(3))
    counts = np.bincount(codes.numpy().ravel(), minlength=8).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    perplexity, dead = codebook_usage(codes, 8)
    assert perplexity == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    assert dead == pytest.approx(float((counts == 0).mean()))
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 4) == (1.0, 0.75)
