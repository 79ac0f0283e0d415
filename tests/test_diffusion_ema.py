"""The EMA of weights: its closed form, its dtype under bf16, skipped steps, resume and ZeRO-2 on 2 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.services import run_dist_script
from trainer.diffusion.ema import EMA, WithEMA


@pytest.mark.parametrize("warmup", [True, False])
def test_after_k_updates_the_ema_is_the_closed_form_weighted_average(warmup):
    """EMA_K = prod_k d_k * p_0 + sum_k (1 - d_k) prod_{j>k} d_j * p_k, in float64 numpy, with
    d_k = min(decay, (1 + k) / (10 + k)) under warm-up (the k-th update, 1-based) else decay."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    decay, updates = 0.95, 30
    ema = EMA(net, decay=decay, warmup=warmup)
    snapshots = [np.concatenate([p.detach().double().numpy().ravel() for p in net.parameters()])]
    for _ in range(updates):
        with torch.no_grad():
            for param in net.parameters():
                param.copy_(torch.randn_like(param))
        snapshots.append(np.concatenate([p.detach().double().numpy().ravel() for p in net.parameters()]))
        ema.update(net)
    d = np.array([min(decay, (1 + k) / (10 + k)) if warmup else decay for k in range(1, updates + 1)])
    expected = np.prod(d) * snapshots[0]
    for k in range(1, updates + 1):
        expected = expected + (1 - d[k - 1]) * np.prod(d[k:]) * snapshots[k]
    got = np.concatenate([t.double().numpy().ravel() for t in ema.state_for().values()])
    # float32 shadows: 30 lerps of O(1) values accumulate ~30 * 6e-8 relative error.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert int(ema.num_updates) == updates


def test_shadows_stay_float32_under_a_bf16_cast_and_skipped_steps_do_not_count():
    torch.manual_seed(0)
    model = WithEMA(torch.nn.Linear(4, 4), decay=0.9)
    before = {k: v.clone() for k, v in model.ema.state_for().items()}
    model.bfloat16()  # what DeepSpeed does to the module under bf16
    assert model.net.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in model.ema.state_for().values())
    assert all(torch.equal(before[k], v) for k, v in model.ema.state_for().items())  # not rounded
    model.ema.follow(model.net, applied_steps=1)
    snapshot = {k: v.clone() for k, v in model.ema.state_for().items()}
    model.ema.follow(model.net, applied_steps=1)  # the next step was skipped: nothing to fold in
    assert all(torch.equal(snapshot[k], v) for k, v in model.ema.state_for().items())
    assert int(model.ema.num_updates) == 1
    assert set(model.state_dict()) >= {"ema.weight", "ema.bias", "ema.num_updates"}  # saved with weights


def test_swapped_into_restores_the_raw_weights():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=0.5, warmup=False)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    raw = net.weight.detach().clone()
    with ema.swapped_into(net):
        assert torch.equal(net.weight, ema.shadow("weight"))
    assert torch.equal(net.weight, raw)


def test_zero2_on_two_ranks_equals_the_single_process_ema_and_survives_resume(tmp_path):
    result = run_dist_script("diffusion_ema.py", tmp_path / "out.json", tmp_path)
    rank0, rank1 = (np.array(values) for values in result["ema_per_rank"])
    oracle = np.array(result["oracle"])
    assert result["ema_dtype"] == "torch.float32"
    assert result["num_updates"] == 6  # 6 applied steps; the NaN batch's skipped step is not one
    np.testing.assert_array_equal(rank0, rank1)  # every rank holds the same full-model EMA
    # fp32 ZeRO-2 training on 2 x 4 samples vs float64 AdamW on the 8 at once: Adam's normalised steps
    # of lr 1e-2 agree to ~1e-6 per step; 1e-4 bounds 6 steps of that with room for round-off.
    np.testing.assert_allclose(rank0, oracle, rtol=0, atol=1e-4)
    # A wrong weight for even one update (decay 0.9 vs the warm-up's) moves the EMA by >> 1e-4.
    np.testing.assert_array_equal(np.array(result["resumed_ema"]), rank0)
