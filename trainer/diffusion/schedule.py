"""The forward (noising) process of DDPM: a beta schedule, its cumulative products, and the algebra
that turns a model's output (eps, x0 or v) into the other two.

Everything is computed once in float64 and cast on use: with 1000 steps the product of ``1 - beta``
loses several digits in float32, and the samplers' ratios of ``alphas_cumprod`` are where that shows.
Timestep ``t`` is 0-based: ``alphas_cumprod[t]`` is the paper's alpha-bar at step ``t + 1``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["eps", "v"]


def _betas(kind: str, num_steps: int) -> torch.Tensor:
    if kind == "linear":  # Ho et al. 2020
        return torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":  # Rombach et al. 2022 (LDM / Stable Diffusion): linear in sqrt(beta)
        return torch.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021: alpha-bar follows cos^2, betas capped at 0.999
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule kind {kind!r}: use linear, scaled_linear or cosine")


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``like`` (batch first), in ``like``'s dtype."""
    picked = values.to(t.device)[t.long()]
    return picked.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    """``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` for a named beta schedule."""

    def __init__(self, kind: ScheduleKind = "linear", num_steps: int = 1000) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.kind = kind
        self.num_steps = num_steps
        self.betas = _betas(kind, num_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, {self.num_steps})"

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` per sample, broadcastable against ``like``; ``t = -1`` means clean data (1.0)."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return _gather(padded, t + 1, like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` per timestep, float64."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t.long()]
        return alpha_bar / (1 - alpha_bar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t`` from the closed form: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        alpha_bar = self.alpha_bar(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022): ``sqrt(abar) noise - sqrt(1 - abar) x0``."""
        alpha_bar = self.alpha_bar(t, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def x0_and_eps(
        self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor, prediction: Prediction
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-data and noise estimates a model output implies at ``(x_t, t)``."""
        alpha_bar = self.alpha_bar(t, x_t)
        signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if prediction == "eps":
            return (x_t - sigma * output) / signal, output
        if prediction == "v":
            return signal * x_t - sigma * output, sigma * x_t + signal * output
        raise ValueError(f"unknown prediction {prediction!r}: use eps or v")

    def output_from(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: Prediction
    ) -> torch.Tensor:
        """What a ``prediction``-type model should output for this ``(x0, eps)`` pair (the inverse)."""
        if prediction == "eps":
            return eps
        if prediction == "v":
            return self.velocity(x0, eps, t)
        raise ValueError(f"unknown prediction {prediction!r}: use eps or v")


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2021): 0 = unconditional, 1 = conditional, >1 = guided."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
