"""DeepSpeed MoE in the DALL-E transformer: expert parallelism, exact top-2 resume, aux loss, config rules,
and sampling from an expert-parallel checkpoint."""

from __future__ import annotations

import argparse

import pytest
import torch

from cluster.commands import sample
from cluster.config import ConfigError, load_config, validate
from cluster.stage_inputs import resolve_stage_inputs
from data_pipeline.tokenizer import build_untrained
from tests.services import run_dist_script
from trainer.checkpoint import list_checkpoints, read_module_state
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.models.moe import MoEConfig, MoEFeedForward
from trainer.stages.dalle import DalleStageConfig, make_loss_fn


def moe_config(**moe) -> DalleConfig:
    return DalleConfig(
        text_vocab_size=40,
        text_len=6,
        image_vocab_size=16,
        image_side=4,
        depth=4,
        heads=2,
        head_dim=8,
        moe=MoEConfig(enabled=True, **moe),
    )


def test_moe_every_k_layers_and_aux_loss_enters_the_loss():
    config = moe_config(every=2, num_experts=4, aux_loss_weight=0.5)
    torch.manual_seed(0)
    model = DalleTransformer(config)
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["DenseFeedForward", "MoEFeedForward"] * 2
    text = torch.randint(1, 40, (2, 6))
    codes = torch.randint(0, 16, (2, 16))
    batch = {"text": text, "codes": codes}
    torch.manual_seed(1)
    loss, metrics = make_loss_fn(config)(model, batch, 0)
    # Top-1 with 4 experts: each layer's GShard aux loss is E * sum(me * ce) >= 1 (1 when balanced).
    assert metrics["moe_aux_loss"] >= 2.0 - 1e-6
    weighted = metrics["text_loss"] / 8 + metrics["image_loss"] * 7 / 8
    assert float(loss.detach()) == pytest.approx(weighted + 0.5 * metrics["moe_aux_loss"], rel=1e-6)
    loss.backward()
    gate = model.blocks[1].ffn.moe.deepspeed_moe.gate.wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the aux loss trains the router


def test_moe_model_builds_on_meta_and_counts_all_experts():
    with torch.device("meta"):
        dense = DalleTransformer(moe_config(every=2, num_experts=4).model_copy(update={"moe": MoEConfig()}))
        sparse = DalleTransformer(moe_config(every=2, num_experts=4))
    ffn = sum(p.numel() for p in dense.blocks[1].ffn.parameters())
    extra = sum(p.numel() for p in sparse.parameters()) - sum(p.numel() for p in dense.parameters())
    router = 4 * dense.config.width  # one gate row per expert, no bias
    assert extra == 2 * (3 * ffn + router)  # two MoE layers, each with three more FFNs and a router
    assert isinstance(sparse.blocks[3].ffn, MoEFeedForward)


def test_config_rules_fail_before_launch():
    base = {
        "data": {"manifest": "file:///nowhere/manifest.json", "tokenizer": "tokenizer.json", "text_len": 6},
        "model": moe_config(every=2).model_dump(),
        "dalle": {"dvae_config": "configs/dvae/tiny.toml"},
    }
    validate(DalleStageConfig, base)
    with pytest.raises(ConfigError, match="DeepSpeed's native MoE refuses ZeRO-3"):
        validate(DalleStageConfig, {**base, "engine": {"zero_stage": 3}})
    bad_split = {**base["model"], "moe": {"enabled": True, "num_experts": 3, "ep_size": 2}}
    with pytest.raises(ConfigError, match=r"model.moe.*divisible by ep_size"):
        validate(DalleStageConfig, {**base, "model": bad_split})


@pytest.fixture(scope="module")
def moe_launch(tmp_path_factory):
    """One 2-rank torchrun launch (gloo, DeepSpeed on CPU) for the whole file; see tests/dist/dalle_moe.py."""
    workdir = tmp_path_factory.mktemp("moe")
    return run_dist_script("dalle_moe.py", workdir / "moe.json", workdir), workdir


def test_expert_parallel_equals_single_group_and_top2_resume_is_exact(moe_launch):
    results, _ = moe_launch
    ep = results["ep"]
    # Same weights, batches and routing noise: ep_size=2 moves tokens by all-to-all instead of keeping
    # them local, which only reorders float32 sums (observed differences ~3e-7).
    assert ep["ep2"] == pytest.approx(ep["ep1"], rel=1e-5)
    assert ep["ep2_aux"] == pytest.approx(ep["ep1_aux"], rel=1e-5)
    assert ep["ep1"][-1] < ep["ep1"][0]
    resume = results["resume"]
    assert resume["resumed"] == resume["reference"]  # bit-identical: the RNG came back with the weights
    assert resume["no_rng"][3:] != resume["reference"][3:]  # without it top-2's noise diverges


def test_tessera_sample_on_an_expert_parallel_checkpoint(moe_launch, tmp_path):
    """The ep_size=2 checkpoint keeps half the experts in each rank's expert files; inference reads them
    all back into one process (ep_size=1) and `tessera sample` draws from it."""
    results, workdir = moe_launch
    (url,) = [info.url for info in list_checkpoints(str(workdir / "top2"))]
    held = {}  # what the two ranks held in memory when they saved, experts under global indices
    for rank in (0, 1):
        held.update(torch.load(workdir / f"held-rank-{rank}.pt", weights_only=True))
    # 2 MoE layers x 4 experts x (weight, bias) of 2 linear layers, half of them from each rank
    assert sum(".deepspeed_experts." in name for name in held) == 2 * 4 * 4
    loaded = read_module_state(url)
    assert set(loaded) == set(held)
    assert all(torch.equal(loaded[name], held[name]) for name in held)

    tokenizer, trainer = build_untrained(vocab_size=260)
    tokenizer.train_from_iterator(["a red star", "a blue hexagon"], trainer=trainer)
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_str())
    parser = argparse.ArgumentParser(prog="tessera")
    sample.register(parser.add_subparsers())
    settings = {
        "data.manifest": "unused",
        "data.tokenizer": str(tmp_path / "tokenizer.json"),
        "data.text_len": 6,
        "model.text_len": 6,
        # dvae_checkpoint stays "auto": the CLI finds the newest checkpoint of this dVAE run
        "dalle.dvae_config": str(tmp_path / "dvae.toml"),
    }
    dvae_run = f'[run]\ncheckpoint_dir = "{workdir / "dvae"}"\n[data]\nmanifest = "unused"\n'
    (tmp_path / "dvae.toml").write_text(dvae_run)
    argv = ["sample", "--run-dir", str(tmp_path / "sample"), "--checkpoint", url, "--top-k", "4"]
    argv += [f"--set={key}={value}" for key, value in settings.items()]
    args = parser.parse_args([*argv, "--prompt", "a red star", "--prompt", "a blue hexagon"])
    assert args.func(args) == 0
    config = load_config(DalleStageConfig, None, [f"{key}={value}" for key, value in settings.items()])
    assert resolve_stage_inputs(config).dalle.dvae_checkpoint == results["dvae"]
    codes = torch.load(tmp_path / "sample" / "samples.pt", weights_only=True)["codes"]
    assert codes.shape == (2, 16) and int(codes.min()) >= 0 and int(codes.max()) < 16
