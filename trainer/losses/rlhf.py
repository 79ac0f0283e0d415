"""Losses of the RLHF stages: reward model, PPO (policy, value, KL, GAE) and DPO, as pure functions.

Shapes follow one convention: per-sequence quantities are ``(batch,)``; per-token ones are
``(batch, time)`` with a ``mask`` of the same shape (1 = a real action, 0 = padding). For the image
generators an episode is one image: every image token is an action and the reward arrives at the end,
so ``rewards`` is zero except at the last real token, plus the per-token KL penalty along the way.

References: InstructGPT (Ouyang et al. 2022) for the recipe; PPO (Schulman et al. 2017); GAE
(Schulman et al. 2016); DPO (Rafailov et al. 2023); the k1/k3 KL estimators (Schulman, "Approximating
KL divergence", 2020).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set (all positions without a mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` to unit variance (and zero mean) over the masked positions only.

    PPO whitens advantages per batch so the step size does not depend on the reward's scale; padding
    must not enter the statistics or short episodes would be scaled by their padding.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position: ``logits`` (B, T, V), ``targets`` (B, T) -> (B, T), in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of token log-probabilities per sequence (B,): the log-likelihood DPO compares."""
    per_token = token_logprobs(logits, targets)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum(dim=-1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model loss ``-log sigmoid(r_chosen - r_rejected)``, mean over pairs."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: ``(mean loss, chosen_rewards, rejected_rewards)``; rewards are per example and detached.

    The implicit reward of a response is ``beta * (log pi(y|x) - log pi_ref(y|x))``; the loss is the
    Bradley-Terry loss of those rewards, so no separate reward model or sampling is needed.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, chosen.detach(), rejected.detach()


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    ``k1 = log pi - log pi_ref`` is unbiased but can be negative per token; ``k3 = (r - 1) - log r``
    with ``r = pi_ref / pi`` is unbiased and never negative; ``k2 = (log r)^2 / 2`` is biased but low
    variance. All three are 0 where the policy equals the reference.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``(batch, time)``: ``(advantages, returns)``.

    ``A_t = sum_l (gamma * lam)^l * delta_{t+l}`` with ``delta_t = r_t + gamma * V_{t+1} - V_t``; the
    value after the last real token is 0 (the episode ends there). ``returns = A + V`` are the value
    targets. Padding positions get 0 advantage. No gradient flows (targets are constants).
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(values.dtype)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: ``(loss, clipfrac)``, both masked means over tokens.

    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``: once the ratio has moved
    past the clip range in the direction the advantage rewards, the token stops pushing. ``clipfrac``
    is the share of tokens where the clipped branch was the active one.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic loss ``0.5 * (V - R)^2``, clipped around the rollout's values as in PPO2: ``(loss, clipfrac)``.

    With ``clip_eps=None`` the plain squared error; with a value, the larger of the plain and the
    clipped error, so the critic cannot move far from the values the advantages were computed with.
    """
    error = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(error, mask), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    return loss, masked_mean((clipped_error > error).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position (B, T, V) -> (B, T), in float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)`` over masked positions (1 = perfect, 0 = a mean)."""
    target_mean = masked_mean(target, mask)
    residual = target - predicted
    residual_var = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    target_var = masked_mean((target - target_mean) ** 2, mask)
    return float(1.0 - residual_var / target_var.clamp_min(1e-12))
