"""The dVAE model and stage: shapes, FLOP count, a short real training run on synthetic data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.config import load_config
from trainer.engine import NonFiniteLossError
from trainer.losses.vae import codebook_usage, marginal_kl_to_uniform
from trainer.models import build, count_parameters
from trainer.models.dvae import DVAE, DVAEConfig
from trainer.stages import dvae as stage
from trainer.tracking import list_artifacts, read_run

TINY = {"image_size": 32, "vocab_size": 64, "hidden": 16, "blocks_per_group": 1, "decoder_init_channels": 16}


@pytest.mark.parametrize("downsample, side", [(4, 8), (8, 4)])
@pytest.mark.parametrize("reconstruction", ["logit_laplace", "mse"])
def test_shapes_and_code_round_trip(downsample, side, reconstruction):
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(**TINY, downsample=downsample, reconstruction=reconstruction))
    images = torch.rand(2, 3, 32, 32)
    output = model(images, temperature=0.5)
    assert output.logits.shape == (2, 64, side, side)
    assert output.decoded.shape == (2, 6 if reconstruction == "logit_laplace" else 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (2, side, side) and codes.dtype == torch.long and int(codes.max()) < 64
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 32, 32) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1


def test_full_preset_builds_on_meta():
    model = build(DVAEConfig(), device="meta")
    assert next(model.parameters()).is_meta
    # The paper's encoder at n_hid=256, 2 blocks per group, 8192 codes: ~53.8M parameters.
    assert count_parameters(model.encoder) == 53_786_240
    with pytest.raises(ValueError, match="no model registered"):
        build(object())


def test_flops_count_every_convolution():
    """FLOPs = forward convs x 3 (backward: grad input + grad weight), less the stem's unneeded grad input."""
    model = DVAE(DVAEConfig(**TINY, downsample=8))
    forward, convs = [], []

    def count(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        forward.append(2 * module.in_channels * module.out_channels * k * output.shape[-2] * output.shape[-1])

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            convs.append(module.register_forward_hook(count))
    model(torch.rand(1, 3, 32, 32))
    assert model.flops_per_sample() == 3 * sum(forward) - forward[0]


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(**TINY, downsample=4))
    images = torch.rand(2, 3, 32, 32)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_activation_checkpointing(checkpointing)
        torch.manual_seed(1)  # same Gumbel noise
        output = model(images, 1.0)
        (output.decoded.square().mean() + output.logits.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, recomputed)


def reference_kl_weight(step: int, kl_weight: float, warmup: int) -> float:
    """The paper's ramp, written out: beta = w * (1 - cos(pi * t / T)) / 2 for t < T, then w."""
    if warmup == 0 or step >= warmup:
        return kl_weight
    return kl_weight * (1 - math.cos(math.pi * step / warmup)) / 2


def reference_temperature(step: int, start: float, end: float, steps: int) -> float:
    """tau = end + (start - end) * (1 + cos(pi * t / T)) / 2 for t < T, then end."""
    if steps == 0 or step >= steps:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def test_schedules_follow_their_formulas():
    """beta rises 0 -> kl_weight and tau falls start -> end, each along half a cosine (random settings)."""
    rng = random.Random(1234)
    for _ in range(20):
        settings = stage.DVAESettings(
            kl_weight=rng.uniform(0.1, 10),
            kl_warmup_steps=rng.choice([0, 1, rng.randint(2, 5000)]),
            temperature_start=rng.uniform(0.5, 2),
            temperature_end=rng.uniform(0.01, 0.4),
            temperature_anneal_steps=rng.choice([0, 1, rng.randint(2, 5000)]),
        )
        longest = max(settings.kl_warmup_steps, settings.temperature_anneal_steps)
        steps = sorted({0, 1, longest, longest + 7, *(rng.randint(0, longest + 10) for _ in range(30))})
        betas = [stage.kl_weight_at(settings, t) for t in steps]
        taus = [stage.temperature_at(settings, t) for t in steps]
        for t, beta, tau in zip(steps, betas, taus):
            # float64 closed forms of the same cosine: agreement to rounding error.
            assert beta == pytest.approx(
                reference_kl_weight(t, settings.kl_weight, settings.kl_warmup_steps), rel=1e-12, abs=1e-12
            )
            assert tau == pytest.approx(
                reference_temperature(
                    t, settings.temperature_start, settings.temperature_end, settings.temperature_anneal_steps
                ),
                rel=1e-12,
            )
        assert all(a <= b for a, b in zip(betas, betas[1:])), "the KL weight must ramp up, never down"
        assert all(a >= b for a, b in zip(taus, taus[1:])), "the temperature must anneal down"
        if settings.kl_warmup_steps:
            assert betas[0] == 0.0


def test_loss_applies_the_schedules(tmp_path):
    """The loss at step t is recon + beta(t) * (latent positions / image dims) * KL, with tau(t) fed to
    the Gumbel-softmax: checked against the formulas, not against the stage's own schedule helpers."""
    config = stage.DVAEStageConfig(
        data={"manifest": str(tmp_path)},
        model={**TINY, "downsample": 4},
        dvae={"kl_weight": 5.0, "kl_warmup_steps": 40, "temperature_anneal_steps": 100},
    )
    torch.manual_seed(0)
    model = DVAE(config.model)
    seen: list[float] = []
    forward = model.forward

    def recording_forward(images, temperature=1.0):  # records the temperature the loss asks for
        seen.append(temperature)
        return forward(images, temperature)

    model.forward = recording_forward
    batch = {"image": torch.rand(3, 3, 32, 32), "valid": torch.tensor([True, True, False])}
    loss_fn = stage.make_loss(config)
    ratio = (32 // 4) ** 2 / (3 * 32 * 32)
    for step in (0, 10, 20, 39, 40, 70, 100, 150):
        loss, metrics = loss_fn(model, batch, step)
        beta = reference_kl_weight(step, 5.0, 40)
        expected = float(metrics["recon"].detach()) + beta * ratio * float(metrics["kl"].detach())
        assert float(loss) == pytest.approx(expected, rel=1e-5), step
        assert seen[-1] == pytest.approx(reference_temperature(step, 1.0, 1 / 16, 100), rel=1e-12), step


def test_marginal_kl_matches_a_float64_reference():
    """KL(batch-mean softmax || uniform) over valid rows, against numpy in float64 on fresh logits."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 11, 3, 5, generator=generator) * 3
    valid = torch.tensor([True, False, True, True])
    array = logits.double().numpy()[valid.numpy()]
    probs = np.exp(array - array.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    q_bar = probs.transpose(0, 2, 3, 1).reshape(-1, 11).mean(0)
    expected = float((q_bar * np.log(q_bar * 11)).sum())
    # float32 softmax of logits ~N(0, 9): relative error well under 1e-5.
    assert float(marginal_kl_to_uniform(logits, valid)) == pytest.approx(expected, rel=1e-5)
    # All positions on one code: log(V); a uniform batch: 0.
    peaked = torch.full((2, 11, 2, 2), -50.0)
    peaked[:, 3] = 50.0
    assert float(marginal_kl_to_uniform(peaked)) == pytest.approx(math.log(11), rel=1e-6)
    assert float(marginal_kl_to_uniform(torch.zeros(2, 11, 2, 2))) == pytest.approx(0.0, abs=1e-6)


def test_code_logits_from_data_use_the_codebook():
    """A random init sends nearly every position of real scenes to one or two codes; the data init
    spreads them over most of the codebook (measured: perplexity ~1.7 -> ~100 of 128)."""
    from data_pipeline.sources.synthetic import generate_scene

    scenes = np.stack([generate_scene(0, i, image_size=32).image for i in range(96)])
    images = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255
    config = DVAEConfig(image_size=32, vocab_size=128, hidden=32, blocks_per_group=1, downsample=4)
    torch.manual_seed(0)
    model = DVAE(config)
    random_perplexity, _ = codebook_usage(model.encode(images[32:]), 128)
    model.init_code_logits(images[:32])
    perplexity, dead = codebook_usage(model.encode(images[32:]), 128)  # on scenes it was not seeded from
    assert random_perplexity < 8
    assert perplexity > 50 and dead < 0.25, (perplexity, dead)


@pytest.fixture(scope="module")
def synthetic_32(ray_local, tmp_path_factory):
    from data_pipeline.ingest import ingest

    dest = str(tmp_path_factory.mktemp("synthetic") / "data")
    ingest("synthetic", dest, num_samples=256, image_size=32, partitions=2, progress=False)
    return dest


def tiny_config(manifest: str, run_dir, **overrides):
    items = [
        f"data.manifest={manifest!r}",
        f"run.run_dir={str(run_dir)!r}",
        "data.num_workers=0",
        "data.validation_batch_size=8",
        "dvae.grid_images=4",
    ] + [
        f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in overrides.items()
    ]
    return load_config(stage.CONFIG, "configs/dvae/tiny.toml", items)


def test_tiny_dvae_uses_its_codebook_and_reconstructs(synthetic_32, tmp_path):
    """The tiny preset's codes carry the image: most of the codebook in use and PSNR from hard codes
    well above the mean-image level a collapsed codebook is stuck at.

    Measured at these settings (100 steps, batch 16, 8 validation scenes = 512 code positions): the
    preset 18.7 dB, perplexity 57, 65% of codes in use, busiest code 6% of positions; the same run
    without data-initialised logits and the usage term (the collapse) 16.5 dB, perplexity 1.0, one
    code at every position. The bars sit between the two with room for run-to-run noise.
    """
    config = tiny_config(
        synthetic_32,
        tmp_path / "run",
        **{
            "engine.micro_batch_size": 16,
            "engine.total_steps": 100,
            "engine.warmup_steps": 5,
            "run.eval_every": 50,
            "run.checkpoint_every": 50,
            "run.log_every": 10,
            "dvae.kl_warmup_steps": 50,
            "dvae.temperature_anneal_steps": 100,
            # The bars were measured on 128 codes; 8 scenes have only 512 positions for the preset's 512.
            "model.vocab_size": 128,
        },
    )
    summary = stage.train(config)
    assert summary["steps"] == 100 and summary["nonfinite_skips"] == 0
    last = summary["last_eval"]
    assert last["val_psnr"] >= 17.8, summary
    assert last["val_psnr"] - summary["first_eval"]["val_psnr"] >= 6.0, summary
    assert last["codebook_perplexity"] >= 30 and last["dead_code_fraction"] <= 0.55, summary
    assert last["top_code_share"] <= 0.15, summary
    client_uri = f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    run = read_run(client_uri, summary["mlflow_run_id"])
    history = [m.value for m in MlflowClient(client_uri).get_metric_history(summary["mlflow_run_id"], "loss")]
    assert len(history) == 10 and history[-1] < history[0]
    for key in (
        "val_psnr",
        "codebook_perplexity",
        "dead_code_fraction",
        "top_code_share",
        "codes_for_half",
        "samples_per_s",
        "tflops",
        "grad_norm",
    ):
        assert key in run.data.metrics, key
    assert "mfu" not in run.data.metrics  # CPU, no configured peak: MFU is left out
    assert run.data.params["lineage.manifest_sha256"] and run.data.params["engine.zero_stage"] == "0"
    assert run.data.tags["checkpoint.latest"].endswith("step-000000100")
    grids = list_artifacts(client_uri, summary["mlflow_run_id"], "grids")
    assert "grids/step-0000100.png" in grids


def test_nonfinite_streak_stops_with_loadable_last_good_state(synthetic_32, tmp_path, monkeypatch):
    """A loss that turns NaN from step 3 on: K skipped steps, then a clear stop and a resumable checkpoint."""
    real_make_loss = stage.make_loss

    def poisoned_make_loss(config):
        loss_fn = real_make_loss(config)

        def loss(model, batch, step):
            value, metrics = loss_fn(model, batch, step)
            return (value * float("nan") if step >= 3 else value), metrics

        return loss

    monkeypatch.setattr(stage, "make_loss", poisoned_make_loss)
    overrides = {
        "engine.micro_batch_size": 8,
        "engine.total_steps": 20,
        "engine.warmup_steps": 2,
        "run.max_nonfinite_in_a_row": 3,
        "run.eval_every": 100,
        "run.checkpoint_every": 100,
    }
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        stage.train(tiny_config(synthetic_32, tmp_path / "run", **overrides))
    monkeypatch.setattr(stage, "make_loss", real_make_loss)

    from trainer.checkpoint import list_checkpoints

    saved = list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    assert [info.step for info in saved] == [6]  # 3 good steps + 3 skipped
    # Resuming (healthy loss now) continues from the saved state with the loader where it stopped.
    summary = stage.train(
        tiny_config(synthetic_32, tmp_path / "run", **{**overrides, "engine.total_steps": 8})
    )
    assert summary["resumed_from"].endswith("step-000000006") and summary["steps"] == 8
    assert summary["nonfinite_skips"] == 3


def test_cli_train_under_torchrun_two_ranks(synthetic_32, tmp_path, capsys):
    """`tessera train dvae --launcher torchrun --num-workers 2`: ZeRO-3 bf16 over gloo, from the CLI
    (eval's encode/decode then run on partitioned parameters)."""
    import argparse
    import json

    from cluster.commands import train as train_command

    parser = argparse.ArgumentParser(prog="tessera")
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train",
            "dvae",
            "--config",
            "configs/dvae/tiny.toml",
            "--run-dir",
            str(tmp_path / "run"),
            "--launcher",
            "torchrun",
            "--num-workers",
            "2",
            *("--set", f"data.manifest={synthetic_32!r}"),
            *(
                "--set",
                "data.num_workers=0",
                "--set",
                "data.validation_batch_size=8",
                "--set",
                "dvae.grid_images=4",
            ),
            *(
                "--set",
                "engine.zero_stage=3",
                "--set",
                "engine.dtype='bf16'",
                "--set",
                "engine.micro_batch_size=8",
            ),
            *(
                "--set",
                "engine.total_steps=4",
                "--set",
                "engine.warmup_steps=1",
                "--set",
                "run.checkpoint_every=4",
            ),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step-000000004")
