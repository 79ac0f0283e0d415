"""Reward model and DPO stages end to end: preference shards (Ray ingest) -> DeepSpeed ZeRO-2 -> checkpoints.

The preferences are synthetic and learnable on purpose: for each of four captions the chosen image is
a fixed code pattern and the rejected one is random codes. The SFT "policy" is a freshly initialised
tiny transformer saved as a real checkpoint. The reward model must rank held-out pairs, and DPO must
move the policy toward the chosen patterns: checked against the frozen reference on held-out pairs and
by what the policy draws greedily afterwards, not only by the loss it optimised.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

from data_pipeline.ingest import ingest
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from trainer.checkpoint import Checkpointer, read_module_state
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.engine import Engine
from trainer.models import build
from trainer.models.dalle import DalleConfig
from trainer.rlhf.policy import image_logprobs
from trainer.rlhf.preferences import PreferencePair, PreferenceSource, RankingFileLabeller, rank_candidates
from trainer.sampling import SamplingConfig, generate_codes
from trainer.stages import dpo, reward
from trainer.tracking import default_tracking_uri, list_artifacts, read_run

NAMES = ("alpha", "beta", "gamma", "delta")
SIDE, VOCAB = 4, 16


def chosen_pattern(name_index: int) -> list[int]:
    return [(3 * name_index + 5 * position) % VOCAB for position in range(SIDE * SIDE)]


def make_pairs(count: int, seed: int) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        name = i % len(NAMES)
        pairs.append(
            PreferencePair(
                prompt=f"a picture of pattern {NAMES[name]}",
                # Distinct pixels per pair, or ingest's exact-duplicate filter would drop them.
                chosen_image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                chosen_codes=chosen_pattern(name),
                rejected_codes=rng.integers(0, VOCAB, SIDE * SIDE).tolist(),
                chosen_score=1.0,
                rejected_score=0.0,
            )
        )
    return pairs


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("prefs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield _preference_data(root)


def _preference_data(root):
    info = {"policy_checkpoint": "synthetic", "labeller": "pattern", "seed": 0}
    train = ingest(
        PreferenceSource(make_pairs(96, 0), info), str(root / "train"), image_size=32, partitions=2
    )
    held = ingest(PreferenceSource(make_pairs(32, 1), info), str(root / "val"), image_size=32, partitions=1)
    assert train.num_samples == 96 and held.num_samples == 32 and train.source_info["pairs"] == 96
    tokenizer = train_tokenizer(str(root / "train"), vocab_size=300, min_frequency=1)
    model = DalleConfig(
        text_vocab_size=load_tokenizer(tokenizer).vocab_size,
        text_len=8,
        image_vocab_size=VOCAB,
        image_side=SIDE,
        depth=2,
        heads=2,
        head_dim=16,
        attention_cycle=["row", "column"],
        conv_kernel_size=3,
    )
    data = DataConfig(
        manifest=str(root / "train"),
        validation_manifest=str(root / "val"),
        tokenizer=tokenizer,
        text_len=8,
        validation_batch_size=32,
    )
    # The SFT checkpoint: a real trainer.checkpoint save of an untrained transformer.
    torch.manual_seed(0)
    engine = Engine(build(model, device="cpu"), EngineConfig(total_steps=2), loss_fn=None)
    sft = Checkpointer(str(root / "sft")).save(engine)
    return {"root": root, "model": model, "data": data, "sft": sft, "tokenizer": tokenizer}


def stage_config(cls, prefs, name: str, section: dict, **engine):
    run = RunConfig(
        name=name, run_dir=str(prefs["root"] / name), eval_every=30, checkpoint_every=30, log_every=10
    )
    settings = {"zero_stage": 2, "micro_batch_size": 16, "lr": 3e-3, "total_steps": 30, "warmup_steps": 2}
    return cls(
        run=run,
        engine=EngineConfig(**{**settings, **engine}),
        data=prefs["data"],
        model=prefs["model"],
        **section,
    )


@pytest.fixture(scope="module")
def reward_run(preference_data):
    config = stage_config(
        reward.RewardStageConfig,
        preference_data,
        "reward",
        {"reward": {"sft_checkpoint": preference_data["sft"]}},
    )
    return reward.train(config)


def test_reward_model_ranks_held_out_pairs(reward_run):
    summary = reward_run
    # A zero-initialised head scores every pair equal at the start: accuracy 0 (ties are not wins).
    assert summary["first_eval"]["val_pair_accuracy"] == 0.0
    # >= 15 of the 16 held-out pairs (a flipped Bradley-Terry sign ranks ~0 of them right). Since the
    # loader's sample-level shuffle one pair stays misranked at 30 and at 60 steps (the data are aligned:
    # captions, chosen and rejected codes checked row by row); all 16 was this order's luck, not a bar.
    assert summary["last_eval"]["val_pair_accuracy"] >= 15 / 16
    assert summary["last_eval"]["val_loss"] < 0.5 * summary["first_eval"]["val_loss"]


def test_dpo_moves_the_policy_toward_chosen_images(preference_data):
    config = stage_config(
        dpo.DPOStageConfig,
        preference_data,
        "dpo",
        {"dpo": {"sft_checkpoint": preference_data["sft"], "beta": 0.05}},
        total_steps=60,
    )
    summary = dpo.train(config)
    first, last = summary["first_eval"], summary["last_eval"]
    # At step 0 the policy is the reference: every implicit reward is exactly 0.
    assert first["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert last["val_preference_accuracy"] >= 0.95 and last["val_reward_margin"] > 1.0

    # The cached reference log-probs cover both manifests and are what a rerun would read.
    with open(dpo.sidecar_url(config.data.manifest, preference_data["sft"])) as handle:
        cache = json.load(handle)
    assert len(cache) == 96

    # Independent check on the trained weights: held-out log-likelihood ratios and greedy drawings.
    reference = build(config.model, device="cpu")
    reference.load_state_dict(read_module_state(preference_data["sft"]))
    policy = build(config.model, device="cpu")
    policy.load_state_dict(read_module_state(summary["checkpoint"]))
    tokenizer = load_tokenizer(preference_data["tokenizer"])
    held = make_pairs(32, 1)
    text = tokenizer.encode_batch([pair.prompt for pair in held], 8)
    chosen = torch.tensor([pair.chosen_codes for pair in held])
    rejected = torch.tensor([pair.rejected_codes for pair in held])
    with torch.no_grad():
        gain_chosen = (image_logprobs(policy, text, chosen) - image_logprobs(reference, text, chosen)).sum(1)
        gain_rejected = (
            image_logprobs(policy, text, rejected) - image_logprobs(reference, text, rejected)
        ).sum(1)
    assert (gain_chosen > gain_rejected).float().mean() >= 0.95

    prompts = tokenizer.encode_batch([f"a picture of pattern {name}" for name in NAMES], 8)
    greedy = SamplingConfig(top_k=1)
    targets = torch.tensor([chosen_pattern(i) for i in range(len(NAMES))])
    before = (generate_codes(reference.eval(), prompts, greedy) == targets).float().mean()
    after = (generate_codes(policy.eval(), prompts, greedy) == targets).float().mean()
    print(f"greedy codes matching the chosen pattern: before {before:.3f} after {after:.3f}")
    assert after >= 0.75 and after > before + 0.5  # chance is 1/16 per code


def test_dpo_nll_term_is_the_chosen_images_cross_entropy():
    """``nll_weight`` adds w x the chosen codes' mean NLL: checked against the SFT loss's image CE."""
    from cluster.config import load_config
    from trainer.stages.dalle import DalleStageConfig
    from trainer.stages.dalle import make_loss_fn as sft_loss_fn

    config = load_config(DalleStageConfig, "configs/dalle/tiny.toml", []).model
    torch.manual_seed(3)
    model = build(config, device="cpu").double()
    rows = 6
    batch = {
        "text": torch.randint(1, config.text_vocab_size, (rows, config.text_len)),
        "chosen": torch.randint(0, config.image_vocab_size, (rows, config.image_side**2)),
        "rejected": torch.randint(0, config.image_vocab_size, (rows, config.image_side**2)),
        "ref_chosen": torch.randn(rows, dtype=torch.float64) - 400,
        "ref_rejected": torch.randn(rows, dtype=torch.float64) - 400,
        "valid": torch.ones(rows),
    }
    plain, _ = dpo.make_loss_fn(0.1)(model, batch, 0)
    weighted, metrics = dpo.make_loss_fn(0.1, nll_weight=0.7)(model, batch, 0)
    # The SFT stage's image loss: mean cross-entropy over the chosen codes, computed by other code.
    _, sft_metrics = sft_loss_fn(config, text_weight=0.0, image_weight=1.0)(
        model, {"text": batch["text"], "codes": batch["chosen"], "valid": batch["valid"]}, 0
    )
    assert metrics["chosen_nll"] == pytest.approx(sft_metrics["image_loss"], rel=1e-9)
    # The stage casts the cached reference log-probs to float32, so the sum carries float32 rounding.
    assert float(weighted - plain) == pytest.approx(0.7 * sft_metrics["image_loss"], rel=1e-6)


def test_rank_candidates_takes_best_and_worst_and_skips_ties(tmp_path):
    codes = torch.arange(2 * 3 * 4).view(2, 3, 4)
    images = torch.rand(2, 3, 3, 8, 8)
    scores = tmp_path / "scores.jsonl"
    entries = {"p00000-s00": 0.5, "p00000-s01": 2.0, "p00000-s02": -1.0}
    entries.update({f"p00001-s{s:02d}": 1.0 for s in range(3)})  # a tie: no preference to read
    scores.write_text("\n".join(json.dumps({"id": k, "score": v}) for k, v in entries.items()))
    pairs, ties = rank_candidates(["first", "second"], codes, images, RankingFileLabeller(str(scores)))
    assert ties == 1 and len(pairs) == 1
    assert pairs[0].chosen_codes == codes[0, 1].tolist() and pairs[0].rejected_codes == codes[0, 2].tolist()
    assert pairs[0].chosen_image.shape == (8, 8, 3) and pairs[0].chosen_image.dtype == np.uint8
    scores.write_text(json.dumps({"id": "p00000-s00", "score": 1}))
    with pytest.raises(ValueError, match="no score for 5 candidates"):
        rank_candidates(["first", "second"], codes, images, RankingFileLabeller(str(scores)))


@pytest.fixture(scope="module")
def dvae_checkpoint(tmp_path_factory):
    """An untrained dVAE for the policy's 4x4 codes: decoding rollouts/candidates needs only the shapes."""
    from trainer.models.dvae import DVAEConfig

    dvae_config = DVAEConfig(
        image_size=16, vocab_size=VOCAB, hidden=8, blocks_per_group=1, downsample=4, decoder_init_channels=8
    )
    engine = Engine(build(dvae_config, device="cpu"), EngineConfig(total_steps=2), loss_fn=None)
    return Checkpointer(str(tmp_path_factory.mktemp("dvae"))).save(engine)


def test_ppo_on_ray_actors_completes_and_survives_a_killed_reward_actor(
    preference_data, reward_run, dvae_checkpoint
):
    from cluster.rl import ppo

    config = ppo.PPOStageConfig(
        run=RunConfig(name="ppo", run_dir=str(preference_data["root"] / "ppo")),
        engine=EngineConfig(micro_batch_size=16, lr=2e-3, total_steps=6, warmup_steps=0),
        data=preference_data["data"],
        model=preference_data["model"],
        ppo={
            "iterations": 3,
            "prompts_per_iteration": 16,
            "ppo_epochs": 2,
            "kl_coef": 0.01,
            "kl_estimator": "k3",
        },
        critic_lr=1e-3,
        rlhf={"sft_checkpoint": preference_data["sft"], "reward_checkpoint": reward_run["checkpoint"]},
        grids={"dvae_checkpoint": dvae_checkpoint, "every": 2, "images": 4},
    )
    state_url = preference_data["root"] / "ppo" / "checkpoints" / ppo.STATE_FILE
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(ppo.train(config)))
    driver.start()
    # Kill the reward actor's process once the first iteration is published; the next call must be retried.
    deadline = time.monotonic() + 600
    while not (state_url.exists() and json.loads(state_url.read_text())["iteration"] >= 1):
        assert driver.is_alive() and time.monotonic() < deadline, "PPO never finished an iteration"
        time.sleep(0.2)
    reward_actor = ray.get_actor(ppo.actor_name(config, "reward"))
    killed_pid, _ = ray.get(reward_actor.identity.remote())
    os.kill(killed_pid, signal.SIGKILL)
    driver.join(timeout=600)
    assert not driver.is_alive() and result, "PPO did not finish after the reward actor was killed"

    assert result["iterations"] == 3 and json.loads(state_url.read_text())["iteration"] == 3
    history = result["history"]
    print(
        "ppo history:",
        [{k: round(h[k], 4) for k in ("reward", "kl", "clipfrac", "value_loss")} for h in history],
    )
    assert all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in history)  # k3 is never negative
    assert history[0]["kl"] < 1e-4  # the first rollout comes from the SFT weights themselves
    assert history[-1]["kl"] > 1e-3  # the policy moved away from the reference
    metrics = read_run(default_tracking_uri(), result["mlflow_run_id"]).data.metrics
    assert {"kl", "reward", "clipfrac", "entropy", "value_loss", "explained_variance"} <= set(metrics)
    # Rollout grids every 2 iterations and at the last one.
    grids = list_artifacts(default_tracking_uri(), result["mlflow_run_id"], "grids")
    assert sorted(grids) == ["grids/iteration-00002.png", "grids/iteration-00003.png"], grids


def test_preferences_command_ranks_policy_samples_into_pair_datasets(
    preference_data, dvae_checkpoint, tmp_path
):
    from cluster.cli import main as tessera
    from data_pipeline.loader import open_loader

    # Human scores: candidate s02 best and s00 worst for every prompt but the last, which is a tie.
    rankings = tmp_path / "rankings.jsonl"
    lines = [
        json.dumps({"id": f"p{p:05d}-s{s:02d}", "score": s if p < 3 else 1.0})
        for p in range(4)
        for s in range(3)
    ]
    rankings.write_text("\n".join(lines) + "\n")
    config = tmp_path / "preferences.toml"
    config.write_text(
        "[preferences]\n"
        f"policy_checkpoint = '{preference_data['sft']}'\n"
        f"dvae_checkpoint = '{dvae_checkpoint}'\n"
        f"tokenizer = '{preference_data['tokenizer']}'\n"
        f"prompts_manifest = '{preference_data['data'].manifest}'\n"
        f"dest = '{tmp_path / 'pairs'}'\n"
        "num_prompts = 4\nsamples_per_prompt = 3\nvalidation_fraction = 0.34\n"
        f"labeller = 'file'\nrankings = '{rankings}'\n"
    )
    assert tessera(["rlhf", "preferences", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    samples = []
    for split in ("train", "val"):
        loader = open_loader(str(tmp_path / "pairs" / split), rank=0, world_size=1, batch_size=4, seed=0)
        for batch in loader:
            samples += [meta for meta, valid in zip(batch["meta"], batch["valid"].tolist()) if valid]
    assert len(samples) == 3  # 4 prompts, one tie
    assert all(m["chosen_score"] == 2.0 and m["rejected_score"] == 0.0 for m in samples)
    assert all(len(m["chosen_codes"]) == len(m["rejected_codes"]) == SIDE * SIDE for m in samples)
