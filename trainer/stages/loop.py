"""The training loop every stage shares: data -> Engine -> checkpoints -> MLflow, resumable.

A stage supplies the model, its loss, how a loader batch becomes engine input and how to evaluate;
this module owns the order of everything else: join the process group, resume (engine, loader, RNG),
step, log, evaluate, checkpoint, and on a run of non-finite losses save the last good state and stop.
The config passed in has ``run`` (RunConfig), ``engine`` (EngineConfig) and ``data`` (DataConfig).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.loader import open_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.step_ledger import StepLedgerWriter
from data_pipeline.storage import join
from trainer.checkpoint import Checkpointer
from trainer.config import config_hash
from trainer.engine import Engine, LossFn, NonFiniteLossError, StepResult

log = logging.getLogger(__name__)

# evaluate(engine, step) -> (metrics, image grid (N, 3, H, W) in [0, 1] or None); runs on every rank.
Evaluate = Callable[[Engine, int], tuple[dict[str, float], torch.Tensor | None]]
Prepare = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass
class StageParts:
    """What a stage contributes to the shared loop."""

    model: torch.nn.Module
    loss_fn: LossFn
    prepare_batch: Prepare
    evaluate: Evaluate
    tokens_per_sample: int = 0
    flops_per_sample: float | None = None


def run_dir_of(config: Any) -> str:
    return config.run.run_dir or os.path.join("runs", config.run.name)


def checkpoint_dir_of(config: Any) -> str:
    return config.run.checkpoint_dir or join(run_dir_of(config), "checkpoints")


def fixed_validation_batch(config: Any, **loader_options: Any) -> Mapping[str, Any]:
    """The first ``validation_batch_size`` samples of the validation (else training) manifest.

    The same samples every evaluation, so validation curves are comparable across steps and runs.
    """
    loader = open_loader(
        config.data.validation_manifest or config.data.manifest,
        rank=0,
        world_size=1,
        batch_size=config.data.validation_batch_size,
        seed=config.run.seed,
        num_workers=0,
        shuffle=False,  # the first samples in tar order: one batch reads one shard, not a whole window
        **loader_options,
    )
    return next(iter(loader))


def _format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Progress:
    """A rank-0 log line every ``log_every`` steps: rates over the steps since the last line, and the ETA.

    Steps/s and samples/s come from the same wall-clock window (loader waits, evaluations and
    checkpoints included), so samples/s is always steps/s times the global batch. The ETA uses the
    average rate since training started: a window between two checkpoints leaves out the periodic
    evaluations and saves, and an ETA from it is short by their share of the run.
    """

    def __init__(self, total: int, start_step: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.clock = clock
        self.first_step = self.last_step = start_step
        self.first_time = self.last_time = clock()

    def line(self, result: StepResult, extra: Mapping[str, float]) -> str:
        now = self.clock()
        steps_per_s = (result.step - self.last_step) / max(1e-9, now - self.last_time)
        self.last_step, self.last_time = result.step, now
        average = (result.step - self.first_step) / max(1e-9, now - self.first_time)
        eta = (self.total - result.step) / average if average > 0 else float("inf")
        shown = " ".join(f"{k} {v:.4g}" for k, v in extra.items())
        return (
            f"step {result.step}/{self.total} loss {result.loss:.4f} lr {result.lr:.3g} "
            f"{steps_per_s * result.samples:.1f} samples/s {steps_per_s:.2f} steps/s "
            f"data wait {result.data_wait_fraction:.0%} ETA {_format_eta(eta)} {shown}"
        ).rstrip()


def run_training(config: Any, parts: StageParts, *, stage: str) -> dict[str, Any]:
    """Train until ``engine.total_steps``; returns a summary (meaningful on rank 0)."""
    run, data = config.run, config.data
    engine = Engine(
        parts.model,
        config.engine,
        parts.loss_fn,
        flops_per_sample=parts.flops_per_sample,
        tokens_per_sample=parts.tokens_per_sample,
        peak_tflops_per_device=run.peak_tflops,
        max_nonfinite_in_a_row=run.max_nonfinite_in_a_row,
    )
    # Same weights everywhere (seeded before the model was built); different noise per rank from here.
    torch.manual_seed(run.seed + 1000 * engine.rank)
    manifest = load_manifest(data.manifest)
    loader = open_loader(
        manifest,
        rank=engine.rank,
        world_size=engine.world_size,
        batch_size=config.engine.micro_batch_size * config.engine.grad_accum,
        seed=run.seed,
        num_workers=data.num_workers,
        shuffle=data.shuffle,
        window_shards=data.window_shards,
        tokenizer=data.tokenizer,
        text_len=data.text_len if data.tokenizer else None,
    )
    checkpointer = Checkpointer(
        checkpoint_dir_of(config),
        keep_last=run.keep_last,
        best_metric=run.best_metric,
        best_mode=run.best_mode,
        config_hash=config_hash(config),
    )
    # "auto" falls back past damaged checkpoints (logged); resume_url is the one actually loaded.
    state = checkpointer.resume(engine, run.resume)
    resume_url = state["url"] if state else None
    if state:
        loader.load_state_dict(state["loader_states"])

    tracker = None
    if engine.rank == 0:
        from trainer.tracking import Tracker

        tracker = Tracker(run.experiment, run.name, run_dir=run_dir_of(config), tags={"stage": stage})
        # content_id names the data itself (shards' names, hashes, counts), wherever and whenever built.
        lineage = {"data_content_id": manifest.content_id(), "manifest_sha256": manifest.sha256()}
        tracker.log_params({**config.model_dump(mode="json"), "lineage": lineage})
        tracker.set_tags({**lineage, "world_size": engine.world_size})
        if resume_url:
            tracker.set_tags({"resumed_from": resume_url})

    summary: dict[str, Any] = {"stage": stage, "start_step": engine.step, "resumed_from": resume_url}
    # A resumed run starts with the metrics its checkpoint measured at that very step.
    last_eval: dict[str, float] = dict(state["metrics"]) if resume_url else {}
    last_eval_step = engine.step if resume_url else -1

    def evaluate() -> dict[str, float]:
        # Evaluation draws nothing from the training RNG: it runs on a forked, freshly seeded copy,
        # so whether and how often a run evaluates never changes its training (resume stays exact).
        with torch.random.fork_rng(devices=[engine.device] if engine.device.type == "cuda" else []):
            torch.manual_seed(run.seed)
            metrics, grid = parts.evaluate(engine, engine.step)
        if tracker is not None:
            tracker.log_metrics(metrics, step=engine.step)
            if grid is not None:
                tracker.log_image_grid(grid, f"grids/step-{engine.step:07d}.png", nrow=8)
        summary.setdefault("first_eval", metrics)
        return metrics

    def save() -> str:
        """A checkpoint with metrics measured on its own weights (evaluated now if not yet)."""
        nonlocal last_eval, last_eval_step
        if last_eval_step != engine.step:
            last_eval, last_eval_step = evaluate(), engine.step
        url = checkpointer.save(
            engine, loader_state=loader.state_dict(), metrics=last_eval, metrics_step=last_eval_step
        )
        if tracker is not None:
            tracker.set_tags({"checkpoint.latest": url})
            tracker.log_metrics({"checkpoint_step": engine.step}, step=engine.step)
        summary["checkpoint"] = url
        return url

    # Which samples each applied step consumed, per rank: proves exactly-once delivery across restarts.
    ledger = StepLedgerWriter(run_dir_of(config), engine.rank, resumed_from_step=engine.step)
    total = config.engine.total_steps
    progress = _Progress(total, engine.step)
    eval_every = run.eval_every or run.checkpoint_every
    status = "FAILED"
    try:
        if not resume_url:
            last_eval, last_eval_step = evaluate(), engine.step
        batches = iter(loader)
        waited = time.perf_counter()  # loader wait + prepare_batch count in the step's wall time
        while engine.step < total:
            batch = next(batches, None)
            if batch is None:  # epoch done: the next one reshuffles
                loader.set_epoch(loader.epoch + 1)
                batches = iter(loader)
                continue
            prepared = parts.prepare_batch(batch)
            try:
                result = engine.train_step(prepared, data_wait_s=time.perf_counter() - waited)
            except NonFiniteLossError:
                url = save()  # the weights are the last good step's; so are the metrics
                log.error("stopping: last good state saved at %s", url)
                raise
            ledger.record(result.step, loader.epoch, batch)  # after the update: a crash mid-step logs nothing
            if tracker is not None and (result.step % run.log_every == 0 or result.step == total):
                metrics = result.log_metrics()
                metrics["nonfinite_skips"] = engine.nonfinite_total
                metrics.update({f"loader_rejects.{why}": n for why, n in loader.reject_counts().items()})
                tracker.log_metrics(metrics, step=result.step)
                log.info(progress.line(result, result.metrics))
            summary["loss"] = result.loss
            if result.step % eval_every == 0 or result.step == total:
                last_eval, last_eval_step = evaluate(), engine.step
            if result.step % run.checkpoint_every == 0 or result.step == total:
                save()
            waited = time.perf_counter()
        status = "FINISHED"
    finally:
        ledger.close()
        if tracker is not None:
            summary["mlflow_run_id"] = tracker.run_id
            tracker.close(status)
    summary.update(
        steps=engine.step,
        last_eval=last_eval,
        nonfinite_skips=engine.nonfinite_total,
        world_size=engine.world_size,
    )
    return summary
