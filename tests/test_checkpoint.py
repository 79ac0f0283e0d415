"""Checkpoints: round trip with RNG and loader state, atomic publish under injected faults, pruning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data_pipeline import storage
from trainer import checkpoint as ckpt
from trainer.checkpoint import COMPLETE, Checkpointer, list_checkpoints, resolve_resume
from trainer.config import EngineConfig
from trainer.engine import Engine


def mse(model, batch, step):
    return ((model(batch["x"]).float() - batch["y"]) ** 2).mean()


def make_engine(seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return Engine(model, EngineConfig(micro_batch_size=4, lr=1e-2, total_steps=50), mse)


def batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 4, generator=generator), "y": torch.randn(4, 1, generator=generator)}


def weights(engine: Engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_round_trip_restores_weights_optimizer_rng_and_loader(tmp_path):
    engine = make_engine()
    for step in range(3):
        engine.train_step(batch(step))
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, config_hash="abc")
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    url = checkpointer.save(
        engine, loader_state={"epoch": 1, "consumed": {"a": [[0, 8]]}}, metrics={"m": 1.0}
    )
    expected_rng = (torch.rand(3).tolist(), np.random.rand(), random.random())
    expected_next = engine.train_step(batch(99)).loss

    fresh = make_engine(seed=5)
    state = Checkpointer(str(tmp_path / "ckpt"), config_hash="abc").load(fresh, url)
    assert state["step"] == 3 and state["loader_states"] == [{"epoch": 1, "consumed": {"a": [[0, 8]]}}]
    assert state["metrics"] == {"m": 1.0} and fresh.step == 3 and fresh.applied_steps == 3
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == expected_rng
    # Same weights *and* Adam moments: the next step's loss is identical.
    assert fresh.train_step(batch(99)).loss == expected_next


def test_fault_before_complete_marker_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpt")
    engine = make_engine()
    engine.train_step(batch(0))
    checkpointer = Checkpointer(root, keep_last=3)
    good = checkpointer.save(engine)
    good_weights = weights(engine)
    engine.train_step(batch(1))

    # Fault injection: the process "dies" right after every checkpoint file is in place but before the
    # COMPLETE marker is written (the last thing a save does), the worst moment for a reader.
    def crash(url: str, data: bytes) -> None:
        raise OSError("injected crash before COMPLETE")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="injected crash"):
        patch.setattr(ckpt.storage, "write_bytes_atomic", crash)
        checkpointer.save(engine)
    broken = ckpt.checkpoint_url(root, 2)
    assert storage.exists(storage.join(broken, "trainer_state.json"))  # the files did land
    assert not storage.exists(storage.join(broken, COMPLETE))

    assert resolve_resume("auto", root) == good  # the half-saved checkpoint is invisible
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        resolve_resume(broken, root)
    fresh = make_engine(seed=3)
    Checkpointer(root).load(fresh, resolve_resume("auto", root))
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), good_weights))

    fresh.train_step(batch(1))
    Checkpointer(root).save(fresh)  # the next save clears the debris and publishes step 2 whole
    assert [info.step for info in list_checkpoints(root)] == [1, 2]


def test_fault_mid_upload_to_object_store(s3_moto, monkeypatch):
    root = s3_moto.url("ckpt")
    engine = make_engine()
    engine.train_step(batch(0))
    checkpointer = Checkpointer(root, keep_last=2)
    good = checkpointer.save(engine)
    engine.train_step(batch(1))

    # Fault injection: the upload dies after two objects, as a killed node would leave it.
    fs, _ = storage.filesystem(root)
    uploaded = []
    real_put = type(fs).put_file

    def flaky_put(self, local, remote, *args, **kwargs):
        if len(uploaded) == 2:
            raise ConnectionError("injected: node lost mid-upload")
        uploaded.append(remote)
        return real_put(self, local, remote, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(ConnectionError):
        patch.setattr(type(fs), "put_file", flaky_put)
        checkpointer.save(engine)
    assert len(storage.list_files(ckpt.checkpoint_url(root, 2))) >= 1  # partial objects are there
    assert resolve_resume("auto", root) == good
    fresh = make_engine(seed=9)
    assert Checkpointer(root).load(fresh, good)["step"] == 1


def test_keep_last_plus_best(tmp_path):
    root = str(tmp_path / "ckpt")
    engine = make_engine()
    checkpointer = Checkpointer(root, keep_last=2, best_metric="val_psnr", best_mode="max")
    for psnr in (10.0, 30.0, 12.0, 11.0, 13.0):
        engine.train_step(batch(engine.step))
        checkpointer.save(engine, metrics={"val_psnr": psnr})
    kept = list_checkpoints(root)
    assert [info.step for info in kept] == [2, 4, 5]  # the best (step 2) and the last two
    assert checkpointer.best().step == 2
    assert resolve_resume("never", root) is None and resolve_resume("auto", root).endswith("step-000000005")
