"""RLHF losses against independent float64 oracles (closed forms, direct loops, exact KL)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses.rlhf import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_whiten,
    ppo_policy_loss,
    sequence_logprobs,
    value_loss,
)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_dpo_loss_and_gradient_signs_match_hand_evaluation():
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(7, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    margins = [
        beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
    ]
    expected = -sum(_log_sigmoid(m) for m in margins) / len(margins)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(chosen, beta * (pc.detach() - rc))
    assert torch.allclose(rejected, beta * (pr.detach() - rr))
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/d pc of -log sigmoid(m) / N = -beta * sigmoid(-m) / N: raising the chosen log-prob lowers the loss.
    expected_grad = torch.tensor(
        [-beta / (1 + math.exp(m)) / len(margins) for m in margins], dtype=torch.float64
    )
    assert torch.allclose(pc.grad, expected_grad, rtol=1e-12)
    assert torch.allclose(pr.grad, -expected_grad, rtol=1e-12)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def _gae_closed_form(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    batch, steps = len(rewards), len(rewards[0])
    advantages = [[0.0] * steps for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        deltas = [
            rewards[b][t] + gamma * (values[b][t + 1] if t + 1 < n else 0.0) - values[b][t] for t in range(n)
        ]
        for t in range(n):
            advantages[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return advantages


def test_gae_matches_the_closed_form_sum_on_ragged_episodes():
    gen = torch.Generator().manual_seed(2)
    lengths = [6, 3, 1, 5]
    steps = max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(steps)] for n in lengths], dtype=torch.float64)
    rewards = torch.randn(len(lengths), steps, generator=gen, dtype=torch.float64) * mask
    # Garbage in the padding must not leak into real positions.
    values = torch.randn(len(lengths), steps, generator=gen, dtype=torch.float64) + 100 * (1 - mask)
    gamma, lam = 0.97, 0.9
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = torch.tensor(
        _gae_closed_form(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=torch.float64
    )
    assert torch.allclose(advantages, expected, atol=1e-12)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-12)
    # lam = 1 gives Monte-Carlo returns: discounted reward-to-go.
    _, mc_returns = gae(rewards, values, mask, gamma, 1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            reward_to_go = sum(gamma**k * rewards[b, t + k].item() for k in range(n - t))
            assert mc_returns[b, t].item() == pytest.approx(reward_to_go, abs=1e-10)


@pytest.mark.parametrize(
    "advantage, ratio, zero_grad",
    [
        (1.0, 1.5, True),  # good action already pushed past 1 + eps: clipped, stops pushing
        (1.0, 0.5, False),  # good action made less likely: the unclipped term still pulls it back
        (-1.0, 0.5, True),  # bad action already pushed below 1 - eps: clipped
        (-1.0, 1.5, False),  # bad action made more likely: still penalised
        (1.0, 1.1, False),  # inside the range: ordinary policy gradient
        (-1.0, 0.9, False),
    ],
)
def test_ppo_clipping_zeroes_the_gradient_only_past_the_range_on_the_advantage_side(
    advantage, ratio, zero_grad
):
    eps = 0.2
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    logprobs = (old + math.log(ratio)).clone().requires_grad_(True)
    advantages = torch.full((1, 4), advantage, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, clipfrac = ppo_policy_loss(logprobs, old, advantages, mask, eps)
    loss.backward()
    clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
    assert loss.item() == pytest.approx(max(-advantage * ratio, -advantage * clipped_ratio), rel=1e-12)
    real = logprobs.grad[0, :3]
    assert logprobs.grad[0, 3].item() == 0.0  # padding never carries gradient
    if zero_grad:
        assert torch.all(real == 0) and clipfrac.item() == pytest.approx(1.0)
    else:
        # d/d logp of -A * exp(logp - old) / 3 tokens
        assert torch.allclose(real, torch.full((3,), -advantage * ratio / 3, dtype=torch.float64), rtol=1e-12)


def test_value_loss_clips_around_the_rollout_values():
    values = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 2.1, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, clipfrac = value_loss(values, old, returns, mask, clip_eps=0.5)
    # token 0: plain (1-2)^2 = 1, clipped value 0.5 -> (0.5-2)^2 = 2.25 (larger); token 1: 0 vs (2.0-2)^2 = 0.
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    plain, _ = value_loss(values, old, returns, mask, clip_eps=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_bradley_terry_separates_separable_preferences():
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(8, generator=gen)

    def pairs(count):
        a, b = torch.randn(count, 8, generator=gen), torch.randn(count, 8, generator=gen)
        a_better = (a @ direction > b @ direction).unsqueeze(1)
        return torch.where(a_better, a, b), torch.where(a_better, b, a)

    chosen, rejected = pairs(512)
    head = torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        bradley_terry_loss(head(chosen).squeeze(1), head(rejected).squeeze(1)).backward()
        optimizer.step()
    held_chosen, held_rejected = pairs(512)
    with torch.no_grad():
        accuracy = (head(held_chosen) > head(held_rejected)).float().mean().item()
    assert accuracy >= 0.97  # separable by a linear score: only pairs near the boundary can be missed


def test_kl_estimators_are_zero_for_the_policy_itself_and_unbiased_for_another():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, dtype=torch.float64, generator=gen)
    ref_logits = logits + torch.randn(6, dtype=torch.float64, generator=gen) * 0.5
    log_p, log_q = logits.log_softmax(0), ref_logits.log_softmax(0)
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=gen)
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(log_p[samples], log_p[samples], kind) == 0)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    for kind in ("k1", "k3"):  # unbiased: the sample mean is within 5 standard errors of the exact KL
        estimates = kl_penalty(log_p[samples], log_q[samples], kind)
        stderr = float(estimates.std()) / math.sqrt(len(samples))
        assert abs(float(estimates.mean()) - exact) < 5 * stderr + 1e-9
    assert torch.all(kl_penalty(log_p[samples], log_q[samples], "k3") >= 0)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(log_p, log_q, "k4")


def test_masked_whiten_and_token_statistics():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(3, 5, dtype=torch.float64, generator=gen) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    whitened = masked_whiten(values, mask)
    real = whitened[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert (real**2).mean().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(whitened[~mask.bool()] == 0)

    logits = torch.randn(2, 4, 7, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 7, (2, 4), generator=gen)
    token_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = [
        sum(
            logits[b, t, targets[b, t]].item() - math.log(sum(math.exp(x) for x in logits[b, t].tolist()))
            for t in range(4)
            if token_mask[b, t]
        )
        for b in range(2)
    ]
    assert sequence_logprobs(logits, targets, token_mask).tolist() == pytest.approx(expected, rel=1e-6)
    uniform = entropy_from_logits(torch.zeros(1, 1, 7))
    assert uniform.item() == pytest.approx(math.log(7), rel=1e-6)

    target = torch.randn(2, 6, dtype=torch.float64, generator=gen)
    full = torch.ones(2, 6)
    assert explained_variance(target, target, full) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, target.mean().item()), target, full) == pytest.approx(
        0.0, abs=1e-12
    )
