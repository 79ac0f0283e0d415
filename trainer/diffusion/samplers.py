"""Reverse-process samplers over a :class:`NoiseSchedule`: DDPM (ancestral), DDIM and DPM-Solver++(2M).

Each takes ``denoise(x_t, t) -> model output`` (eps or v, per ``prediction``) and walks a descending
list of timesteps from pure noise to clean data; the step after the last timestep is ``t = -1``
(``abar = 1``), where the estimate of x0 is the sample. Guidance lives in ``denoise`` (see
:func:`guided`), so every sampler gets classifier-free guidance the same way. Sampler arithmetic runs
in float64 (the model sees its own dtype): the coefficients are ratios of numbers close to 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from trainer.diffusion.schedule import NoiseSchedule, Prediction, cfg_combine

SamplerKind = Literal["ddpm", "ddim", "dpmpp"]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` distinct timesteps evenly spread from ``T - 1`` down to 0 (all of them at ``steps = T``)."""
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps must be in 1..{schedule.num_steps}, got {steps}")
    spread = torch.linspace(schedule.num_steps - 1, 0, steps, dtype=torch.float64).round().long()
    return [int(t) for t in spread]


def guided(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    null_context: torch.Tensor,
    scale: float,
) -> Denoise:
    """``denoise`` for ``model(x, t, context)`` with classifier-free guidance at ``scale``.

    Conditional and unconditional predictions come from ONE forward over a doubled batch; at scale 1
    the unconditional half is skipped.
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, context)
    both_contexts = torch.cat([null_context.expand_as(context), context])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = model(torch.cat([x, x]), torch.cat([t, t]), both_contexts).chunk(2)
        return cfg_combine(uncond, cond, scale)

    return denoise


def _predict(
    denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, t: int, prediction: Prediction, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    output = denoise(x.to(dtype), t_batch).to(torch.float64)
    return schedule.x0_and_eps(x, output, t_batch, prediction)


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


@torch.no_grad()
def sample(
    denoise: Denoise,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    *,
    sampler: SamplerKind = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (the x_T draw) into a sample, in ``noise``'s dtype.

    ``ddpm`` draws fresh noise at each of the ``steps`` steps (``generator``); ``ddim`` does too when
    ``eta > 0``; ``dpmpp`` is deterministic.
    """
    dtype = noise.dtype
    x = noise.to(torch.float64)
    ts = timesteps(schedule, steps)
    step = {"ddpm": _ddpm_step, "ddim": _ddim_step, "dpmpp": _dpmpp_step}.get(sampler)
    if step is None:
        raise ValueError(f"unknown sampler {sampler!r}: use ddpm, ddim or dpmpp")
    history: list[tuple[torch.Tensor, float]] = []  # dpmpp: the previous x0 estimate and its lambda
    for index, t in enumerate(ts):
        s = ts[index + 1] if index + 1 < len(ts) else -1
        x0, eps = _predict(denoise, schedule, x, t, prediction, dtype)
        x = step(schedule, x, x0, eps, t, s, eta=eta, generator=generator, history=history)
    return x.to(dtype)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)


def _ddpm_step(schedule, x, x0, eps, t, s, *, generator, **_) -> torch.Tensor:
    """Ancestral step to ``s`` from the posterior ``q(x_s | x_t, x0)`` (Ho et al. eq. 6-7).

    For strided steps the single-step betas become ``1 - abar_t / abar_s``.
    """
    abar_t, abar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
    beta = 1 - abar_t / abar_s
    mean = (abar_s**0.5 * beta / (1 - abar_t)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_s) / (1 - abar_t)) * x
    if s < 0:
        return mean
    variance = (1 - abar_s) / (1 - abar_t) * beta
    return mean + variance**0.5 * _noise_like(x, generator)


def _ddim_step(schedule, x, x0, eps, t, s, *, eta, generator, **_) -> torch.Tensor:
    """Song et al. eq. 12: re-noise the x0 estimate to level ``s`` along the predicted eps direction."""
    abar_t, abar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5
    x_s = abar_s**0.5 * x0 + (1 - abar_s - sigma**2) ** 0.5 * eps
    return x_s + sigma * _noise_like(x, generator) if sigma > 0 else x_s


def _dpmpp_step(schedule, x, x0, eps, t, s, *, history, **_) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in log-SNR time ``lambda = log(alpha / sigma)``.

    Second order from the second step on, first order on the first and on the final step to clean
    data (where lambda is infinite), as diffusers' ``lower_order_final`` does.
    """
    abar_t, abar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
    lambda_t = 0.5 * math.log(abar_t / (1 - abar_t))
    previous = history[-1] if history else None
    history.append((x0, lambda_t))
    if s < 0:
        return x0
    lambda_s = 0.5 * math.log(abar_s / (1 - abar_s))
    h = lambda_s - lambda_t
    estimate = x0
    if previous is not None:
        x0_prev, lambda_prev = previous
        r = (lambda_t - lambda_prev) / h
        estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    sigma_t, sigma_s = (1 - abar_t) ** 0.5, (1 - abar_s) ** 0.5
    return (sigma_s / sigma_t) * x - abar_s**0.5 * math.expm1(-h) * estimate
