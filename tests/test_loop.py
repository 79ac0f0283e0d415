"""The shared training loop: a crash and a resume replay exactly the uninterrupted run, sample for sample.

A tiny stage of this file's own (a linear model on image means) runs through ``run_training`` on a
real ingested dataset: the loader, DeepSpeed, the checkpointer and the MLflow tracker are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from data_pipeline.ledger import SampleLedger, manifest_keys
from data_pipeline.manifest import Manifest, SourceLineage, load_manifest, save_manifest
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.synthetic import generate_scene
from data_pipeline.validate import encode_jpeg
from trainer.checkpoint import Checkpointer, list_checkpoints, read_module_state
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.stages.loop import StageParts, run_training
from trainer.tracking import read_run

SAMPLES, BATCH, STEPS = 24, 4, 9  # 6 steps an epoch: the run crosses into a second epoch


class TinyStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig
    engine: EngineConfig
    data: DataConfig


class Crash(RuntimeError):
    """Raised by the loss at a chosen step: the process dies mid-step, after a checkpoint."""


def write_dataset(dest: Path) -> str:
    """Synthetic scenes in two shards, written by the ingest's own ShardWriter (no Ray needed)."""
    entries = []
    for partition in range(2):
        writer = ShardWriter(str(dest), partition, max_bytes=2**30, max_samples=SAMPLES)
        for index in range(partition * SAMPLES // 2, (partition + 1) * SAMPLES // 2):
            scene = generate_scene(0, index, image_size=16)
            writer.write(
                f"scene-{index:05d}",
                {"jpg": encode_jpeg(Image.fromarray(scene.image), 95), "txt": scene.caption.encode()},
            )
        entries += writer.close()
    manifest = Manifest(
        source=SourceLineage(spec="synthetic", kind="synthetic", seed=0),
        image_size=16,
        num_samples=SAMPLES,
        total_bytes=sum(e.bytes for e in entries),
        shards=entries,
    )
    save_manifest(manifest, str(dest))
    return str(dest)


def tiny_parts(ledger: dict[int, list[str]], crash_at: int | None = None) -> StageParts:
    """A linear model on per-channel image means, with noise from the training RNG on its inputs and an
    evaluation that draws from the global RNG too: any RNG the loop fails to restore or isolate shows."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    def prepare_batch(batch):
        means = batch["image"].float().mean(dim=(2, 3)) / 255.0
        return {"x": means + 0.01 * torch.randn_like(means), "keys": batch["__key__"]}

    def loss_fn(engine, micro, step):
        if step + 1 == crash_at:
            raise Crash(f"killed during step {crash_at}")
        ledger.setdefault(step + 1, []).extend(micro["keys"])
        return (engine(micro["x"]).float() - 0.5).square().mean()

    def evaluate(engine, step):
        return {
            "val_noise": float(torch.rand(())),
            "val_weight_norm": float(model.weight.detach().norm()),
        }, None

    return StageParts(model=model, loss_fn=loss_fn, prepare_batch=prepare_batch, evaluate=evaluate)


def config_for(tmp_path: Path, data: str, name: str, eval_every: int | None = None) -> TinyStageConfig:
    return TinyStageConfig(
        run=RunConfig(
            name=name,
            run_dir=str(tmp_path / name),
            checkpoint_every=3,
            eval_every=eval_every,
            log_every=1,
            keep_last=5,
        ),
        engine=EngineConfig(
            micro_batch_size=BATCH // 2, grad_accum=2, lr=1e-2, warmup_steps=1, total_steps=STEPS
        ),
        data=DataConfig(manifest=data, num_workers=0),
    )


@pytest.mark.slow
def test_crash_and_resume_replays_the_uninterrupted_run(tmp_path, monkeypatch):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    data = write_dataset(tmp_path / "data")

    straight: dict[int, list[str]] = {}
    straight_parts = tiny_parts(straight)
    # eval_every 2 does not divide checkpoint_every 3: checkpoints must still carry their own metrics.
    summary = run_training(config_for(tmp_path, data, "straight", eval_every=2), straight_parts, stage="tiny")
    logged = read_run(tracking_uri, summary["mlflow_run_id"]).data.metrics
    assert 0 <= logged["data_wait_fraction"] < 1 and logged["samples_per_s"] > 0
    saved = list_checkpoints(f"{tmp_path}/straight/checkpoints")
    assert [(info.step, info.metrics_step) for info in saved] == [(3, 3), (6, 6), (9, 9)]
    for info in saved:  # the metric is the weight norm, recomputed here from the checkpoint's weights
        weight = read_module_state(info.url)["weight"]
        assert info.metrics["val_weight_norm"] == pytest.approx(float(weight.norm()), rel=1e-6)

    config = config_for(tmp_path, data, "crashed")
    before_crash: dict[int, list[str]] = {}
    with pytest.raises(Crash):
        run_training(config, tiny_parts(before_crash, crash_at=5), stage="tiny")
    assert [info.step for info in list_checkpoints(f"{tmp_path}/crashed/checkpoints")] == [3]
    # The resumed process evaluates at every step: evaluation must not touch the training RNG.
    resumed_config = config.model_copy(update={"run": config.run.model_copy(update={"eval_every": 1})})
    after_resume: dict[int, list[str]] = {}
    resumed_parts = tiny_parts(after_resume)
    summary = run_training(resumed_config, resumed_parts, stage="tiny")
    assert summary["resumed_from"].endswith("step-000000003") and summary["steps"] == STEPS

    # Step 4 ran twice (before the crash, lost; after the resume): the run that counts is the last.
    assert sorted(after_resume) == list(range(4, STEPS + 1))
    crashed = before_crash | after_resume
    assert crashed == straight
    assert all(len(keys) == BATCH for keys in straight.values()) and sorted(straight) == list(range(1, 10))
    # The first epoch (steps 1-6) delivered every sample of the shards exactly once, across the crash.
    ledger = SampleLedger()
    for step in range(1, 7):
        keys = crashed[step]
        ledger.record({"__url__": [""] * len(keys), "__key__": keys, "valid": torch.ones(len(keys))})
    expected = {("", key) for _, key in manifest_keys(load_manifest(data))}
    ledger.check_exactly_once(expected, epoch=0)
    # Same samples in the same order and the same RNG: the same weights, bit for bit.
    for got, want in zip(resumed_parts.model.parameters(), straight_parts.model.parameters(), strict=True):
        assert torch.equal(got, want)


def test_keep_best_ignores_metrics_measured_on_other_weights(tmp_path):
    """A checkpoint carrying an earlier step's metrics is never ranked best, however good they look."""
    from trainer.engine import Engine

    torch.manual_seed(0)
    engine = Engine(
        torch.nn.Linear(2, 1),
        EngineConfig(micro_batch_size=2, total_steps=10),
        lambda model, batch, step: model(batch["x"]).square().mean(),
    )
    root = str(tmp_path / "ckpt")
    checkpointer = Checkpointer(root, keep_last=1, best_metric="val_loss")
    for metrics, measured_at in [({"val_loss": 2.0}, 1), ({"val_loss": 1.0}, 1), ({"val_loss": 3.0}, 3)]:
        engine.train_step({"x": torch.randn(2, 2)})
        checkpointer.save(engine, metrics=metrics, metrics_step=measured_at)
    assert checkpointer.best().step == 1  # step 2's 1.0 was measured on step 1's weights
    assert [info.step for info in list_checkpoints(root)] == [1, 3]
    markers = [json.loads((Path(info.url) / "COMPLETE").read_text()) for info in list_checkpoints(root)]
    assert [m["metrics_step"] for m in markers] == [1, 3]


def _step_result(step: int, samples: int = 32):
    from trainer.engine import StepResult

    return StepResult(
        step=step,
        loss=1.0,
        applied=True,
        nonfinite=False,
        lr=1e-3,
        grad_norm=1.0,
        samples=samples,
        tokens=0,
        step_time_s=0.1,
        data_wait_fraction=0.25,
        samples_per_s=320.0,
        tokens_per_s=0.0,
        tflops=None,
        mfu=None,
    )


def test_progress_line_rates_agree():
    """samples/s in the progress line is steps/s times the global batch, from one wall-clock window."""
    from trainer.stages.loop import _Progress

    words = _Progress(total=100, start_step=0).line(_step_result(10), {}).split()
    samples_per_s = float(words[words.index("samples/s") - 1])
    steps_per_s = float(words[words.index("steps/s") - 1])
    assert samples_per_s == pytest.approx(32 * steps_per_s, rel=0.02)  # both printed rounded
    assert "data wait 25%" in " ".join(words)


def test_eta_counts_the_periodic_checkpoints():
    """A simulated run: 1 s per step, a 5 s checkpoint after every 20th, a line every 10 steps. Once two
    checkpoints are behind it, the printed ETA is within 25% of the time the run really has left (21% at
    worst here). An ETA from the rate between two lines is a third short at step 80: its window holds no
    checkpoint while two are still ahead."""
    from trainer.stages.loop import _format_eta, _Progress

    def finish_time(step: int) -> float:  # when `step` is done, its checkpoint included
        return step + 5 * (step // 20)

    now = [0.0]
    progress = _Progress(total=100, start_step=0, clock=lambda: now[0])
    for step in range(10, 100, 10):
        now[0] = step + 5 * ((step - 1) // 20)  # the line is printed before this step's checkpoint
        line = progress.line(_step_result(step), {})
        if step >= 50:
            truth = finish_time(100) - now[0]
            shown = line.split("ETA ")[1].split()[0]
            assert abs(_seconds(shown) - truth) <= 0.25 * truth, (step, shown, _format_eta(truth))


def _seconds(eta: str) -> int:
    hours, _, rest = eta.rpartition("h") if "h" in eta else ("0", "", eta)
    minutes, seconds = rest.rstrip("s").split("m") if "m" in rest else (rest.rstrip("m"), "0")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
