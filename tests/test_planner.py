"""The cluster planner against DeepSpeed's own model-state estimators, and its own consistency."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
)
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)

from cluster.planner import PlanInputs, plan
from kernels.masks import dalle_mask
from trainer.models.dalle import DalleConfig
from trainer.models.moe import MoEConfig

DALLE_12B = DalleConfig()  # the defaults are the paper's 12B shape
SMALL = DalleConfig(text_vocab_size=4096, text_len=64, image_side=16, depth=12, heads=8, head_dim=64)


def deepspeed_gpu_bytes(census, nodes: int, gpus_per_node: int, zero_stage: int) -> int:
    """DeepSpeed's per-GPU model-state bytes without offload: the numbers its ``*_all_cold`` tables print."""
    if zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(
            census.total_params, gpus_per_node, nodes, cpu_offload=False
        )[1]
    return estimate_zero3_model_states_mem_needs(
        census.total_params, census.largest_layer_params, gpus_per_node, nodes, cpu_offload=False
    )[1]


@pytest.mark.parametrize("model", [DALLE_12B, SMALL], ids=["12b", "small"])
@pytest.mark.parametrize("nodes,gpus_per_node", [(1, 1), (1, 8), (8, 8), (32, 8), (128, 8)])
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_model_states_agree_with_deepspeed_estimators(model, nodes, gpus_per_node, zero_stage):
    ours = plan(model, PlanInputs(nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=zero_stage))
    theirs = deepspeed_gpu_bytes(ours.census, nodes, gpus_per_node, zero_stage) / 2**30
    assert abs(ours.model_states_gb / theirs - 1) < 0.10, (ours.model_states_gb, theirs)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_printed_all_cold_tables_show_the_same_numbers(capsys, zero_stage):
    census = plan(DALLE_12B, PlanInputs(nodes=8, gpus_per_node=8)).census
    if zero_stage == 2:
        estimate_zero2_model_states_mem_needs_all_cold(census.total_params, num_gpus_per_node=8, num_nodes=8)
    else:
        estimate_zero3_model_states_mem_needs_all_cold(
            census.total_params, census.largest_layer_params, num_gpus_per_node=8, num_nodes=8
        )
    row = next(line for line in capsys.readouterr().out.splitlines() if "offload_optimizer=none" in line)
    printed = float(re.findall(r"([\d.]+)GB", row)[1])
    assert printed == pytest.approx(deepspeed_gpu_bytes(census, 8, 8, zero_stage) / 2**30, abs=0.006)


def test_zero_stages_shrink_model_states_in_order():
    states = [plan(DALLE_12B, PlanInputs(nodes=8, zero_stage=stage)).model_states_gb for stage in range(4)]
    assert states == sorted(states, reverse=True)
    # Plain data parallel: 20 bytes per parameter on every GPU (12.3B params -> ~229 GiB).
    assert states[0] == pytest.approx(20 * 12.294e9 / 2**30, rel=0.01)


def test_largest_micro_batch_is_the_boundary_of_fitting():
    inputs = PlanInputs(nodes=1, gpus_per_node=8, gpu_memory_gb=80, zero_stage=3)
    best = plan(SMALL, inputs).max_micro_batch
    assert best >= 1
    assert plan(SMALL, inputs.model_copy(update={"micro_batch": best})).fits
    assert not plan(SMALL, inputs.model_copy(update={"micro_batch": best + 1})).fits


def test_checkpointing_trades_activation_memory_and_flash_avoids_scores():
    base = PlanInputs(nodes=8, zero_stage=3, micro_batch=2)
    on = plan(DALLE_12B, base)
    off = plan(DALLE_12B, base.model_copy(update={"activation_checkpointing": False}))
    eager = plan(
        DALLE_12B, base.model_copy(update={"activation_checkpointing": False, "flash_attention": False})
    )
    assert on.activation_gb < off.activation_gb < eager.activation_gb


def test_step_time_follows_tokens_flops_and_mfu():
    inputs = PlanInputs(nodes=8, zero_stage=3, micro_batch=4, mfu=0.4, peak_tflops=312)
    one = plan(DALLE_12B, inputs)
    assert one.tokens_per_step == 4 * 64 * DALLE_12B.seq_len
    expected = one.tokens_per_step * one.census.flops_per_token / (64 * 312e12 * 0.4)
    assert one.step_time_s == pytest.approx(expected)
    # Weak scaling: 4x the GPUs at the same micro-batch keeps the step time, 4x the tokens.
    four = plan(DALLE_12B, inputs.model_copy(update={"nodes": 32}))
    assert four.step_time_s == pytest.approx(one.step_time_s)
    assert four.tokens_per_step == 4 * one.tokens_per_step
    # 6 FLOPs per parameter per token dominate a 12B model's count.
    assert one.census.flops_per_token == pytest.approx(6 * 12.2e9, rel=0.1)


def column_major(text_len: int, side: int, length: int) -> list[int]:
    image = [text_len + row * side + column for column in range(side) for row in range(side)]
    return [p for p in list(range(text_len)) + image if p < length]


def computed_tiles(config: DalleConfig, kind: str) -> int:
    """64x64 tiles with any allowed pair, for one layer's mask in the order the layer attends in."""
    seq = config.seq_len
    order = column_major(config.text_len, config.image_side, seq) if kind == "column" else list(range(seq))
    mask = dalle_mask(config.text_len, config.image_side, kind)[order][:, order]
    return sum(bool(mask[i : i + 64, j : j + 64].any()) for i in range(0, seq, 64) for j in range(0, seq, 64))


def test_step_time_scales_with_the_flops_the_kernels_compute():
    """Column vs full layers differ only in computed attention tiles; experts cost the same at any ep_size."""
    inputs = PlanInputs(nodes=1, gpus_per_node=8, zero_stage=1, micro_batch=2, mfu=0.5, peak_tflops=100)
    per_second = inputs.gpus * 100e12 * 0.5
    column, full = (
        plan(SMALL.model_copy(update={"attention_cycle": [kind], "last_layer_attention": None}), inputs)
        for kind in ("column", "full")
    )
    assert column.census.total_params == full.census.total_params
    skipped = computed_tiles(SMALL, "full") - computed_tiles(SMALL, "column")
    assert skipped > 0  # column-major order lets the kernel skip tiles causal attention computes
    saved_flops = 12 * SMALL.width * SMALL.depth * skipped * 64 * 64 / SMALL.seq_len
    assert full.step_time_s - column.step_time_s == pytest.approx(
        full.tokens_per_step * saved_flops / per_second, rel=1e-9
    )
    dense = plan(SMALL, inputs)
    moe_step = []
    for ep_size in (1, 8):
        moe = MoEConfig(enabled=True, every=2, num_experts=8, top_k=2, ep_size=ep_size)
        moe_step.append(plan(SMALL.model_copy(update={"moe": moe}), inputs).step_time_s)
    # Per MoE layer: a gate (width x 8) and a second expert FFN (2 x width x 4 width) on top of the dense FFN.
    extra = 6 * (SMALL.depth // 2) * (SMALL.width * 8 + 2 * SMALL.width * 4 * SMALL.width)
    expected = dense.step_time_s + dense.tokens_per_step * extra / per_second
    assert moe_step == pytest.approx([expected, expected], rel=1e-9)


def test_experts_are_split_over_the_expert_parallel_group():
    moe = SMALL.model_copy(update={"moe": MoEConfig(enabled=True, every=2, num_experts=8, ep_size=1)})
    single = plan(moe, PlanInputs(nodes=1, gpus_per_node=8, zero_stage=0))
    split_moe = moe.model_copy(update={"moe": moe.moe.model_copy(update={"ep_size": 8})})
    split = plan(split_moe, single.inputs)
    assert single.census.expert_params > 0
    saved = single.model_states_gb - split.model_states_gb
    assert saved == pytest.approx(20 * single.census.expert_params * 7 / 8 / 2**30, rel=1e-6)
    with pytest.raises(ValueError, match="expert-parallel groups of 8"):
        plan(split_moe, PlanInputs(nodes=1, gpus_per_node=4))


def test_plan_command_reads_the_preset_and_says_whether_it_fits(capsys):
    import argparse

    from cluster.commands import plan as plan_command

    parser = argparse.ArgumentParser(prog="tessera")
    plan_command.register(parser.add_subparsers())
    preset = ["plan", "--config", str(Path(__file__).resolve().parents[1] / "configs/dalle/dalle-12b.toml")]
    fits = parser.parse_args([*preset, "--nodes", "8"])
    assert fits.func(fits) == 0
    assert "12.294 B" in capsys.readouterr().out
    # The paper's 16 GB V100s cannot hold ZeRO-2's replicated 16-bit weights (docs/scaling.md).
    v100 = parser.parse_args(
        [*preset, "--nodes", "128", "--gpu-memory-gb", "16", "--set", "engine.zero_stage=2", "--json"]
    )
    assert v100.func(v100) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["inputs"]["zero_stage"] == 2


def test_plans_pasted_in_docs_are_what_the_command_prints(capsys):
    """docs/scaling.md pastes `tessera plan` commands with their output; re-run each and compare."""
    import argparse

    from cluster.commands import plan as plan_command

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "scaling.md").read_text()
    pasted = re.findall(r"```\n(tessera plan [^`]*?)\n```\n```\n([^`]*?)\n```", doc)
    assert len(pasted) >= 2  # the column-major 12B preset and the MoE preset
    parser = argparse.ArgumentParser(prog="tessera")
    plan_command.register(parser.add_subparsers())
    for command, output in pasted:
        argv = shlex.split(command.replace("\\\n", " "))[1:]
        argv[argv.index("--config") + 1] = str(root / argv[argv.index("--config") + 1])
        args = parser.parse_args(argv)
        args.func(args)
        assert capsys.readouterr().out.strip() == output.strip(), command
