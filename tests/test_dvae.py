"""The dVAE model and stage: shapes, FLOP count, a short real training run on synthetic data."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.config import load_config
from trainer.engine import NonFiniteLossError
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


def test_cosine_anneal_endpoints():
    assert stage.cosine_anneal(0, 1.0, 1 / 16, 100) == 1.0
    assert stage.cosine_anneal(50, 1.0, 1 / 16, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert stage.cosine_anneal(100, 1.0, 1 / 16, 100) == 1 / 16
    assert stage.cosine_anneal(5, 0.0, 6.6, 0) == 6.6


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


def test_tiny_dvae_learns(synthetic_32, tmp_path):
    """Loss falls and hard-code reconstruction PSNR on the fixed validation batch rises >= 3 dB."""
    config = tiny_config(
        synthetic_32,
        tmp_path / "run",
        **{
            "engine.micro_batch_size": 16,
            "engine.total_steps": 60,
            "engine.warmup_steps": 5,
            "run.eval_every": 30,
            "run.checkpoint_every": 30,
            "run.log_every": 10,
            "dvae.kl_warmup_steps": 30,
            "dvae.temperature_anneal_steps": 60,
        },
    )
    summary = stage.train(config)
    assert summary["steps"] == 60 and summary["nonfinite_skips"] == 0
    gain = summary["last_eval"]["val_psnr"] - summary["first_eval"]["val_psnr"]
    assert gain >= 3.0, summary
    client_uri = f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    run = read_run(client_uri, summary["mlflow_run_id"])
    history = [m.value for m in MlflowClient(client_uri).get_metric_history(summary["mlflow_run_id"], "loss")]
    assert len(history) == 6 and history[-1] < history[0]
    for key in (
        "val_psnr",
        "codebook_perplexity",
        "dead_code_fraction",
        "samples_per_s",
        "tflops",
        "grad_norm",
    ):
        assert key in run.data.metrics, key
    assert "mfu" not in run.data.metrics  # CPU, no configured peak: MFU is left out
    assert run.data.params["lineage.manifest_sha256"] and run.data.params["engine.zero_stage"] == "0"
    assert run.data.tags["checkpoint.latest"].endswith("step-000000060")
    grids = list_artifacts(client_uri, summary["mlflow_run_id"], "grids")
    assert "grids/step-0000060.png" in grids


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
