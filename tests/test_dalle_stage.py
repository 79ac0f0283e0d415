"""``tessera train dalle`` end to end on CPU: synthetic scenes -> tokenizer -> dVAE checkpoint -> transformer.

The dataset is written with the ingest's own ``ShardWriter`` from the synthetic source (no Ray needed);
the dVAE is the real ``dvae`` stage run for a couple of steps (its codes only need to be a fixed
function of the image); the transformer then trains through the shared loop, DeepSpeed and MLflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cluster.commands import sample
from cluster.config import load_config
from data_pipeline.manifest import Manifest, SourceLineage, save_manifest
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.synthetic import SyntheticSource, generate_scene
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from data_pipeline.validate import encode_jpeg
from trainer.checkpoint import read_module_state
from trainer.tracking import default_tracking_uri, list_artifacts

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 192


def write_synthetic(dest: Path) -> str:
    writer = ShardWriter(str(dest), 0, max_bytes=2**30, max_samples=SAMPLES)
    for index in range(SAMPLES):
        scene = generate_scene(0, index, image_size=32)
        writer.write(
            f"scene-{index:05d}",
            {
                "jpg": encode_jpeg(Image.fromarray(scene.image), 95),
                "txt": scene.caption.encode(),
                "json": json.dumps(scene.metadata).encode(),
            },
        )
    entries = writer.close()
    manifest = Manifest(
        source=SourceLineage(spec="synthetic", kind="synthetic", seed=0),
        image_size=32,
        num_samples=SAMPLES,
        total_bytes=sum(e.bytes for e in entries),
        shards=entries,
        source_info=SyntheticSource(seed=0, image_size=32).info(),  # as the ingest records it
    )
    save_manifest(manifest, str(dest))
    return str(dest)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, str]:
    """Dataset, tokenizer and a 2-step dVAE checkpoint, shared by this file's dalle runs."""
    from trainer.stages import dvae

    root = tmp_path_factory.mktemp("dalle-inputs")
    data = write_synthetic(root / "data")
    tokenizer = train_tokenizer(data, vocab_size=256)
    dvae_config = load_config(
        dvae.DVAEStageConfig,
        REPO / "configs" / "dvae" / "tiny.toml",
        [
            f"data.manifest='{data}'",
            f"run.run_dir='{root / 'dvae'}'",
            "engine.total_steps=2",
            "engine.warmup_steps=0",
            "engine.micro_batch_size=8",
            "run.eval_every=2",
            "run.checkpoint_every=2",
        ],
    )
    return {"data": data, "tokenizer": tokenizer, "dvae": dvae.train(dvae_config)["checkpoint"]}


def input_overrides(prepared: dict[str, str]) -> list[str]:
    return [
        f"data.manifest='{prepared['data']}'",
        f"data.tokenizer='{prepared['tokenizer']}'",
        f"dalle.dvae_checkpoint='{prepared['dvae']}'",
    ]


@pytest.mark.slow
def test_tiny_dalle_trains_and_logs_samples(prepared, tmp_path, monkeypatch):
    from trainer.stages import dalle

    monkeypatch.chdir(REPO)  # the presets name each other by repo-relative path
    overrides, tokenizer = input_overrides(prepared), prepared["tokenizer"]
    run_dir = tmp_path / "dalle"
    config = load_config(
        dalle.DalleStageConfig,
        REPO / "configs" / "dalle" / "tiny.toml",
        overrides
        + [
            f"run.run_dir='{run_dir}'",
            "engine.total_steps=40",
            "engine.warmup_steps=4",
            "engine.micro_batch_size=16",
            "engine.lr=3e-3",
            "run.eval_every=40",
            "run.checkpoint_every=40",
            "run.log_every=10",
        ],
    )
    summary = dalle.train(config)

    frozen = dalle.load_frozen_dvae(config.dalle.dvae_checkpoint)
    wrong = config.model_copy(
        update={"model": config.model.model_copy(update={"image_side": 4, "text_pad_id": 3})}
    )
    with pytest.raises(ValueError, match=r"image_side 4 != the dVAE's latent side 8(.|\n)*pad id 0"):
        dalle.check_compatible(wrong, frozen, load_tokenizer(tokenizer))

    first, last = summary["first_eval"], summary["last_eval"]
    assert summary["steps"] == 40
    # From uniform guessing (ln 128 = 4.85 per code) the model must learn the codes' statistics.
    assert last["val_image_loss"] < 0.8 * first["val_image_loss"]
    assert last["val_text_loss"] < 0.8 * first["val_text_loss"]
    grids = list_artifacts(default_tracking_uri(), summary["mlflow_run_id"], "grids")
    assert len(grids) == 2  # held-out prompts sampled at step 0 and at the end

    # `tessera sample` from the final checkpoint: a grid PNG and an MLflow run with it.
    parser = argparse.ArgumentParser(prog="tessera")
    sample.register(parser.add_subparsers())
    sample_dir = tmp_path / "sample"
    args = parser.parse_args(
        ["sample", "--config", "configs/dalle/tiny.toml", "--run-dir", str(sample_dir)]
        + [f"--set={item}" for item in overrides]
        + [
            "--checkpoint",
            summary["checkpoint"],
            "--prompt",
            "a large red star",
            "--prompt",
            "a small blue hexagon",
        ]
        + ["--top-k", "16", "--guidance-scale", "3"]
    )
    assert args.func(args) == 0
    with Image.open(sample_dir / "samples.png") as grid:
        assert grid.size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # two 32 px images, 2 px padding
    assert torch.load(sample_dir / "samples.pt")["codes"].shape == (2, 64)


@pytest.mark.slow
def test_resumed_dalle_run_is_bit_identical(prepared, tmp_path, monkeypatch):
    """2 steps, stop, resume, 2 more == 4 steps straight: every training loss and every weight, exactly.

    Caption dropout draws from the training RNG each step, and evaluation (validation loss, then codes
    sampled for the manifest's held-out prompts) runs at start, at each checkpoint and after resuming
    only in the interrupted run: any evaluation touching the training RNG changes the dropped captions.
    The LR is constant (no warmup, min_lr_ratio 1), so stopping at total_steps=2 is a clean interruption.
    """
    from trainer.stages import dalle

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses: list[tuple[int, float]] = []
    make_loss_fn = dalle.make_loss_fn

    def recording_loss_fn(*args, **kwargs):
        loss_fn = make_loss_fn(*args, **kwargs)

        def loss_and_record(model, batch, step):
            loss, parts = loss_fn(model, batch, step)
            if model.training:  # evaluation calls it too, on the module in eval mode
                losses.append((step, float(loss.detach())))
            return loss, parts

        return loss_and_record

    monkeypatch.setattr(dalle, "make_loss_fn", recording_loss_fn)

    def run(name: str, total_steps: int) -> dict:
        config = load_config(
            dalle.DalleStageConfig,
            REPO / "configs" / "dalle" / "tiny.toml",
            input_overrides(prepared)
            + [
                f"run.run_dir='{tmp_path / name}'",
                f"engine.total_steps={total_steps}",
                "engine.warmup_steps=0",
                "engine.min_lr_ratio=1.0",
                "engine.micro_batch_size=8",
                "dalle.caption_dropout=0.5",
                "run.eval_every=1",
                "run.checkpoint_every=2",
                "data.num_workers=0",
                "data.validation_batch_size=4",
            ],
        )
        return dalle.train(config)

    straight = run("straight", 4)
    straight_losses, losses[:] = list(losses), []
    run("interrupted", 2)
    resumed = run("interrupted", 4)
    assert resumed["resumed_from"].endswith("step-000000002")
    assert [step for step, _ in straight_losses] == [0, 1, 2, 3]
    assert losses == straight_losses
    assert resumed["last_eval"] == straight["last_eval"]  # metrics measured at step 4 by each run
    final = read_module_state(resumed["checkpoint"])
    for name, weight in read_module_state(straight["checkpoint"]).items():
        assert torch.equal(final[name], weight), name


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_checkpoint_weights_reload_for_sampling(tmp_path, zero_stage):
    """ZeRO-3 partitions parameters: the model must train under it and its checkpoint read back whole."""
    import deepspeed

    from trainer.checkpoint import Checkpointer, read_module_state
    from trainer.config import EngineConfig
    from trainer.engine import Engine
    from trainer.models.dalle import DalleConfig, DalleTransformer
    from trainer.stages.dalle import make_loss_fn

    config = DalleConfig(
        text_vocab_size=40, text_len=6, image_vocab_size=16, image_side=4, depth=2, heads=2, head_dim=8
    )
    torch.manual_seed(0)
    engine_config = EngineConfig(zero_stage=zero_stage, micro_batch_size=2, total_steps=2)
    engine = Engine(DalleTransformer(config), engine_config, make_loss_fn(config))
    batch = {"text": torch.randint(1, 40, (2, 6)), "codes": torch.randint(0, 16, (2, 16))}
    assert engine.train_step(batch).applied
    url = Checkpointer(str(tmp_path / "checkpoints")).save(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    model = DalleTransformer(config)
    model.load_state_dict(read_module_state(url))
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name]), name
