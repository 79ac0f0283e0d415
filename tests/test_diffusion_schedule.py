"""Noise schedules, eps/x0/v algebra, guidance and the samplers against independent oracles.

The sampler oracle is data with a known distribution: for x0 ~ N(m, s^2) the exact denoiser is closed
form, so a correct sampler fed that denoiser must output N(m, s^2) samples; that checks every
coefficient of every step end to end without a trained network.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import NoiseSchedule, cfg_combine, guided, sample, timesteps

KINDS = ["linear", "scaled_linear", "cosine"]
DATA_MEAN, DATA_STD = 0.7, 0.4


def numpy_alphas_cumprod(kind: str, steps: int) -> np.ndarray:
    """The papers' formulas, written independently of the code under test."""
    if kind == "linear":
        return np.cumprod(1 - np.linspace(1e-4, 0.02, steps))
    if kind == "scaled_linear":
        return np.cumprod(1 - np.linspace(math.sqrt(0.00085), math.sqrt(0.012), steps) ** 2)
    f = np.cos((np.arange(steps + 1) / steps + 0.008) / 1.008 * np.pi / 2) ** 2
    return f[1:] / f[0]  # Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0), before clipping


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1000, 250])
def test_alphas_cumprod_match_independent_formulas(kind, steps):
    schedule = NoiseSchedule(kind, steps)
    expected = numpy_alphas_cumprod(kind, steps)
    got = schedule.alphas_cumprod.numpy()
    assert schedule.alphas_cumprod.dtype == torch.float64
    if kind == "cosine":
        # The 0.999 cap only bites on the last step(s), where f -> 0; everywhere else no clipping.
        assert float(schedule.betas.max()) <= 0.999
        unclipped = schedule.betas.numpy() < 0.999
        np.testing.assert_allclose(got[unclipped], expected[unclipped], rtol=1e-12, atol=0)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)  # float64 round-off only


def test_published_anchor_values():
    """Values quoted in the literature for T = 1000: Stable Diffusion's terminal SNR is 0.004682 (Lin et
    al. 2024, "Common diffusion noise schedules are flawed", table 1); DDPM's linear one ends at 4.04e-5."""
    last = torch.tensor([999])
    assert float(NoiseSchedule("scaled_linear").snr(last)) == pytest.approx(0.004682, rel=1e-3)
    assert float(NoiseSchedule("linear").alphas_cumprod[-1]) == pytest.approx(4.036e-5, rel=1e-3)
    assert float(NoiseSchedule("cosine").betas[-1]) == 0.999


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_equals_iterating_the_markov_chain(kind):
    """Exact moment propagation of q(x_t | x_{t-1}) step by step (float64) vs the closed form, every t;
    then ``add_noise``'s draws against the chain's moments at several t (Monte Carlo)."""
    schedule = NoiseSchedule(kind, 1000)
    x0 = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    mean, var, worst = x0.clone(), torch.zeros_like(x0), 0.0
    for t in range(1000):
        beta = schedule.betas[t]
        mean, var = (1 - beta).sqrt() * mean, (1 - beta) * var + beta
        t_batch = torch.full((4,), t)
        closed_mean = schedule.add_noise(x0, torch.zeros_like(x0), t_batch)
        closed_std = schedule.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t_batch)
        worst = max(worst, float((mean - closed_mean).abs().max()), float((var - closed_std**2).abs().max()))
    assert worst < 1e-12, worst  # float64 round-off over 1000 products


def test_add_noise_draws_match_the_markov_chain_moments():
    """One Monte Carlo pass of the chain with 10k draws vs ``add_noise``'s draws at several t."""
    schedule = NoiseSchedule("cosine", 1000)
    x0 = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    n = 10_000
    chain = x0.expand(n, 4).clone()
    for t in range(1000):
        beta = schedule.betas[t]
        chain = (1 - beta).sqrt() * chain + beta.sqrt() * torch.randn(
            n, 4, generator=generator, dtype=torch.float64
        )
        if t in (0, 10, 300, 999):
            noise = torch.randn(n, 4, generator=generator, dtype=torch.float64)
            direct = schedule.add_noise(x0.expand(n, 4), noise, torch.full((n,), t))
            # Means of 10k draws with std <= 1 differ by <= 5 * sqrt(2 / n) ~ 0.07 (5 sigma); stds by less.
            assert float((chain.mean(0) - direct.mean(0)).abs().max()) < 5 * math.sqrt(2 / n)
            assert float((chain.std(0) - direct.std(0)).abs().max()) < 5 * math.sqrt(1 / n)


@pytest.mark.parametrize("kind", KINDS)
def test_eps_x0_v_conversions_are_mutual_inverses(kind):
    schedule = NoiseSchedule(kind, 1000)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 4, 3, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=generator)
    x_t = schedule.add_noise(x0, eps, t)
    a = torch.from_numpy(
        numpy_alphas_cumprod("linear", 1000) if kind == "linear" else schedule.alphas_cumprod.numpy()
    )
    a = a[t].view(-1, 1, 1, 1)
    # v's definition (Salimans & Ho 2022, eq. after 9), written out here
    torch.testing.assert_close(schedule.velocity(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0)
    for prediction in ("eps", "v"):
        output = schedule.output_from(x0, eps, t, prediction)
        x0_back, eps_back = schedule.x0_and_eps(x_t, output, t, prediction)
        # x0 = (x_t - sigma eps) / alpha divides by alpha ~ 6e-3 at t = 999: 1e-9 leaves room for that.
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)


def test_cfg_combine_endpoints_and_extrapolation():
    uncond, cond = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(cfg_combine(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 3.0), uncond + 3 * (cond - uncond))


def test_guidance_is_one_batched_forward_and_matches_separate_calls():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context.sum(-1).view(-1, 1) + t.view(-1, 1)

    x, t = torch.randn(3, 2), torch.tensor([5, 5, 5])
    context, null = torch.randn(3, 4), torch.zeros(1, 4)
    out = guided(model, context, null, 2.5)(x, t)
    assert calls == [6]
    expected = cfg_combine(model(x, t, null.expand(3, 4)), model(x, t, context), 2.5)
    torch.testing.assert_close(out, expected)
    calls.clear()
    guided(model, context, null, 1.0)(x, t)
    assert calls == [3]  # scale 1: the conditional prediction alone


def gaussian_denoiser(schedule: NoiseSchedule, prediction: str):
    """The exact E[eps | x_t] (or E[v | x_t]) for x0 ~ N(DATA_MEAN, DATA_STD^2), from Bayes' rule."""
    abar = schedule.alphas_cumprod

    def denoise(x, t):
        a = abar[t].view(-1, *([1] * (x.ndim - 1))).sqrt()
        sigma = (1 - a**2).sqrt()
        total = a**2 * DATA_STD**2 + sigma**2
        eps = sigma * (x - a * DATA_MEAN) / total
        x0 = DATA_MEAN + a * DATA_STD**2 * (x - a * DATA_MEAN) / total
        return eps if prediction == "eps" else a * eps - sigma * x0

    return denoise


def exact_flow(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """Where an exact sampler takes x_T for Gaussian data. The probability-flow ODE is the monotone
    affine map between the Gaussian marginals, x_t = a_t m + sqrt(a_t^2 s^2 + 1 - a_t^2) z, from T down
    to t = 0; the samplers' last move outputs E[x0 | x_t=0], which shrinks z by a_0 s / sqrt(...)."""
    a2_T, a2_0 = schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0]
    z = (x_T - a2_T.sqrt() * DATA_MEAN) / (a2_T * DATA_STD**2 + 1 - a2_T).sqrt()
    return DATA_MEAN + DATA_STD * z * a2_0.sqrt() * DATA_STD / (a2_0 * DATA_STD**2 + 1 - a2_0).sqrt()


@pytest.mark.parametrize("kind, prediction", [("linear", "eps"), ("scaled_linear", "v"), ("cosine", "eps")])
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(kind, prediction):
    """DDIM(eta=0) is first order (error halves when steps double), DPM-Solver++(2M) second order
    (quarters). Measured ratios at 100/200/400 steps: DDIM ~2.0, DPM++ 2.9-4.3; a sign or
    coefficient error breaks both."""
    schedule = NoiseSchedule(kind, 1000)
    x_T = torch.linspace(-3, 3, 61, dtype=torch.float64).view(-1, 1)
    exact = exact_flow(schedule, x_T)
    denoise = gaussian_denoiser(schedule, prediction)
    for sampler, low, high in (("ddim", 1.8, 2.2), ("dpmpp", 2.6, 5.0)):
        errors = [
            float(
                (sample(denoise, schedule, x_T, sampler=sampler, steps=n, prediction=prediction) - exact)
                .abs()
                .max()
            )
            for n in (100, 200, 400)
        ]
        assert errors[-1] < 0.03, (sampler, errors)
        for coarse, fine in zip(errors, errors[1:]):
            assert low < coarse / fine < high, (sampler, errors)


@pytest.mark.parametrize("kind, prediction", [("linear", "eps"), ("cosine", "v")])
def test_ddpm_ancestral_sampling_recovers_the_data_distribution(kind, prediction):
    schedule = NoiseSchedule(kind, 1000)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    out = sample(
        gaussian_denoiser(schedule, prediction),
        schedule,
        noise,
        sampler="ddpm",
        steps=1000,
        prediction=prediction,
        generator=generator,
    )
    # Monte Carlo: the mean of 8000 values with std 0.4 is within 5 * 0.4 / sqrt(8000) = 0.022 (5 sigma);
    # the std within ~5 * 0.4 / sqrt(16000) = 0.016. 1000 ancestral steps add ~0.003 of bias (measured).
    assert float(out.mean()) == pytest.approx(DATA_MEAN, abs=0.022)
    assert float(out.std()) == pytest.approx(DATA_STD, abs=0.016)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    schedule = NoiseSchedule("linear", 1000)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    denoise = lambda x, t: net(torch.cat([x, t.view(-1, 1).float() / 1000], 1))
    noise = torch.randn(5, 2)
    torch.manual_seed(0)
    first = sample(denoise, schedule, noise, sampler="ddim", steps=20, eta=0.0)
    torch.manual_seed(123)
    second = sample(denoise, schedule, noise, sampler="ddim", steps=20, eta=0.0)
    assert torch.equal(first, second)
    stochastic = [
        sample(
            denoise,
            schedule,
            noise,
            sampler="ddim",
            steps=20,
            eta=1.0,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (0, 1)
    ]
    assert not torch.allclose(stochastic[0], stochastic[1])


def test_ddim_with_all_steps_follows_the_ddpm_posterior():
    """DDIM over all 1000 steps against DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. eq. 11 and
    sigma^2 = beta-tilde, written here from the paper). With eta = 1 every DDIM step is that posterior:
    its mean, recovered by replaying the sampler's noise draws, matches to float64 round-off, and the
    ancestral DDPM sampler gives the same trajectory. (With eta = 0 the step is the probability-flow
    ODE, which differs from the posterior mean by O(beta_t) per step by design; that it reaches the same
    distribution is the exact-flow and moment tests above.)"""
    schedule = NoiseSchedule("linear", 1000)
    denoise = gaussian_denoiser(schedule, "eps")
    betas, abar = schedule.betas, schedule.alphas_cumprod
    assert timesteps(schedule, 1000) == list(range(999, -1, -1))
    visited = []

    def recording(x, t):
        visited.append(x.clone())
        return denoise(x, t)

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    final = sample(
        recording,
        schedule,
        x_T,
        sampler="ddim",
        steps=1000,
        eta=1.0,
        generator=torch.Generator().manual_seed(4),
    )
    replay = torch.Generator().manual_seed(4)
    worst = 0.0
    for index, t in enumerate(range(999, -1, -1)):
        x_t = visited[index]
        eps = denoise(x_t, torch.full((64,), t))
        ddpm_mean = (x_t - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t > 0:
            beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
            drawn = beta_tilde.sqrt() * torch.randn(x_t.shape, generator=replay, dtype=torch.float64)
            ddim_mean = visited[index + 1] - drawn
        else:
            ddim_mean = final  # the last step adds no noise
        worst = max(worst, float((ddim_mean - ddpm_mean).abs().max()))
    assert worst < 1e-9, worst  # float64 round-off through different algebra
    ddpm = sample(
        denoise, schedule, x_T, sampler="ddpm", steps=1000, generator=torch.Generator().manual_seed(4)
    )
    assert float((ddpm - final).abs().max()) < 1e-9
