"""The DeepSpeed engine: config building, schedules, the 2-rank ZeRO matrix, non-finite skips, MoE groups."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.config import ConfigError, validate
from tests.services import run_dist_script
from trainer.config import EngineConfig
from trainer.engine import (
    Engine,
    NonFiniteLossError,
    build_ds_config,
    lr_multiplier,
    parameter_groups,
    peak_tflops,
    split_micro_batches,
)


def test_lr_schedule_matches_closed_form():
    kwargs = {"warmup_steps": 4, "total_steps": 20, "min_lr_ratio": 0.1}
    assert [lr_multiplier(s, **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(4, 25):
        progress = min(1.0, (step - 4) / 16)
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_multiplier(step, **kwargs) == pytest.approx(expected, rel=1e-12)
    assert lr_multiplier(20, **kwargs) == pytest.approx(0.1)


def test_ds_config_from_typed_config():
    config = EngineConfig(
        zero_stage=2, dtype="bf16", micro_batch_size=4, grad_accum=3, grad_clip=0.5, total_steps=10
    )
    ds = build_ds_config(config, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds  # torch_adam: the Engine passes a torch AdamW
    offload = build_ds_config(EngineConfig(zero_stage=3, offload_optimizer=True), world_size=1)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"dtype": "fp16"}, "needs a CUDA GPU"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"warmup_steps": 10, "total_steps": 10}, "warmup_steps"),
        ({"offload_optimizer": True}, "zero_stage >= 1"),
        ({"torch_adam": False}, "cannot skip non-finite"),
        ({"lr_typo": 1.0}, "unknown field"),
    ],
)
def test_engine_config_rejects_bad_values(fields, message):
    if fields.get("dtype") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    with pytest.raises(ConfigError, match=message):
        validate(EngineConfig, fields, "engine")


def test_split_micro_batches():
    batch = {"x": torch.arange(6), "keys": list("abcdef"), "tag": "t"}
    parts = split_micro_batches(batch, 3)
    assert [p["x"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["keys"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert all(p["tag"] == "t" for p in parts)
    with pytest.raises(ValueError, match="equal micro-batches"):
        split_micro_batches({"x": torch.arange(5)}, 2)


def test_peak_tflops_prefers_configured_value():
    assert peak_tflops("bf16", 123.0) == 123.0
    if not torch.cuda.is_available():
        assert peak_tflops("bf16") is None  # CPU: report TFLOP/s, leave MFU out


@pytest.fixture(scope="module")
def engine_matrix(tmp_path_factory):
    """ZeRO 0-3 x fp32/bf16 x accumulation in ONE 2-rank torchrun launch (see tests/dist/engine_matrix.py)."""
    workdir = tmp_path_factory.mktemp("matrix")
    return run_dist_script("engine_matrix.py", workdir / "matrix.json", workdir)


def test_zero_matrix_two_ranks(engine_matrix):
    results = {name: result for name, result in engine_matrix.items() if name != "oracle"}
    assert len(results) == 12
    for name, result in results.items():
        # A run stopped, saved, reloaded into a differently initialised model and continued (with a NaN
        # batch skipped on the way) is bit-identical to one that never stopped.
        assert result["resumed"] == result["reference"], name
        assert result["resumed_params"] == result["reference_params"], name
        assert result["skipped"] == [2] and result["nonfinite_total"] == 1, name
        assert result["grad_norms"][1] is None and all(
            g > 0 for i, g in enumerate(result["grad_norms"]) if i != 1
        )
        assert result["loader_states"] == [{"rank": 0}, {"rank": 1}], name
        assert "non-finite for 3 optimizer steps in a row" in result["streak_error"], name
        assert result["streak_params_unchanged"], name
        assert all(loss > 0 and math.isfinite(loss) for loss in result["reference"])
    # bf16 tracks fp32 to bf16 precision (8 mantissa bits over a few steps).
    assert results["zero2-bf16-accum2"]["reference"] == pytest.approx(
        results["zero2-fp32-accum2"]["reference"], rel=5e-2
    )


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_accumulation_matches_float64_full_batch_oracle(engine_matrix, stage, accum):
    """k micro-batches of m per rank, on 2 ranks, equal ONE float64 backward over all 2*k*m samples.

    The oracle (tests/dist/engine_matrix.py ``oracle``) is plain torch: no DeepSpeed, no accumulation,
    no Engine. Losses and pre-clip gradient norms are compared per step (AdamW is nearly blind to a
    gradient's scale, so a loss divided by the accumulation twice shows in the norm, not the weights),
    the weights after 6 steps. Tolerances: fp32 against float64 on sums of <= 16 * 16 terms is ~1e-7
    relative; each AdamW step moves a weight by at most ~lr = 1e-2 with a relative error of that order,
    and weights are stored in fp32 (ulp ~3e-8 at 0.3). Measured: losses 1.3e-7 and norms 1.7e-7
    relative, weights 1e-7 absolute, so the bounds (1e-5, 1e-5, 1e-6) leave ~10-70x margin, while a
    wrong micro-batch changes the gradient by O(1) and a weight by ~lr on the first step, and a loss
    divided by the accumulation twice halves the gradient norm.
    """
    oracle = engine_matrix["oracle"]
    result = engine_matrix[f"zero{stage}-fp32-accum{accum}"]
    assert result["reference"] == pytest.approx(oracle["losses"], rel=1e-5)
    assert result["reference_grad_norms"] == pytest.approx(oracle["grad_norms"], rel=1e-5)
    for got, want in zip(result["reference_params"], oracle["params"], strict=True):
        assert got == pytest.approx(want, abs=1e-6)


class TinyMoE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.inp = torch.nn.Linear(4, 8)
        self.moe = MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2, ep_size=1, k=1)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        hidden, aux_loss, _ = self.moe(self.inp(x))
        return self.out(hidden), aux_loss


def moe_loss(model, batch, step):
    prediction, aux_loss = model(batch["x"])
    mse = ((prediction.float() - batch["y"]) ** 2).mean()
    return mse + 0.01 * aux_loss, {"aux_loss": aux_loss}


def test_moe_parameter_groups_and_step():
    from trainer.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = TinyMoE()
    groups = parameter_groups(model, weight_decay=0.1)
    moe_groups = [g for g in groups if g.get("moe")]
    assert moe_groups and all(
        hasattr(p, "allreduce") and not p.allreduce for g in moe_groups for p in g["params"]
    )
    expert = next(p for g in moe_groups for p in g["params"])
    before = expert.detach().clone()
    config = EngineConfig(zero_stage=1, micro_batch_size=4, lr=1e-2, total_steps=10)
    engine = Engine(model, config, moe_loss)
    result = engine.train_step({"x": torch.randn(4, 4), "y": torch.randn(4, 1)})
    assert result.applied and math.isfinite(result.loss) and "aux_loss" in result.metrics
    assert not torch.equal(expert.detach(), before)  # the expert trained through its own param group


def test_nan_only_on_marked_batches_single_process():
    """A loss that turns NaN for marked batches: those steps are skipped and counted, the rest train."""

    def marked_loss(model, batch, step):
        loss = (model(batch["x"]).float() ** 2).mean()
        return loss + float("nan") if batch["poison"] else loss

    torch.manual_seed(0)
    engine = Engine(
        torch.nn.Linear(3, 1),
        EngineConfig(micro_batch_size=2, total_steps=10),
        marked_loss,
        max_nonfinite_in_a_row=2,
    )
    weight = engine.module.weight.detach().clone()
    results = [engine.train_step({"x": torch.randn(2, 3), "poison": p}) for p in (True, False, True)]
    assert [r.applied for r in results] == [False, True, False]
    assert engine.nonfinite_total == 2 and engine.nonfinite_in_a_row == 1 and engine.applied_steps == 1
    assert not torch.equal(engine.module.weight.detach(), weight)
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        engine.train_step({"x": torch.randn(2, 3), "poison": True})


def test_optimizer_offload_with_torch_adamw():
    """ZeRO-2 with the optimizer on CPU; torch's AdamW steps the offloaded fp32 partitions (no C++ build)."""
    torch.manual_seed(0)
    config = EngineConfig(zero_stage=2, offload_optimizer=True, micro_batch_size=2, total_steps=10)
    engine = Engine(
        torch.nn.Linear(3, 2), config, lambda model, batch, step: model(batch["x"]).square().mean()
    )
    before = engine.module.weight.detach().clone()
    assert engine.train_step({"x": torch.randn(2, 3)}).applied
    assert not torch.equal(engine.module.weight.detach(), before)


def test_step_rates_count_the_data_wait():
    """Samples/s, TFLOP/s and the data-wait share are over the step's wall time, loader wait included."""
    torch.manual_seed(0)
    config = EngineConfig(micro_batch_size=2, grad_accum=2, total_steps=10)
    engine = Engine(
        torch.nn.Linear(3, 1),
        config,
        lambda model, batch, step: model(batch["x"]).square().mean(),
        flops_per_sample=1e9,
        peak_tflops_per_device=1.0,
    )
    result = engine.train_step({"x": torch.randn(4, 3)}, data_wait_s=2.0)
    assert result.step_time_s > 2.0
    assert result.data_wait_fraction == pytest.approx(2.0 / result.step_time_s)
    assert result.samples_per_s == pytest.approx(4 / result.step_time_s)
    assert result.tflops == pytest.approx(1e9 * 4 / result.step_time_s / 1e12)
    assert result.mfu == pytest.approx(result.tflops)
    assert result.log_metrics()["data_wait_fraction"] == result.data_wait_fraction  # goes to MLflow
