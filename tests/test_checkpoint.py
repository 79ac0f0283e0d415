"""Checkpoints: round trip with RNG and loader state, atomic publish under injected faults, pruning;
hostile and damaged checkpoints; fsync before the marker; weights read back and exported as the fp32
master copy, also by DeepSpeed's own zero_to_fp32.py."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from tests.services import run_dist_script
from trainer import checkpoint as ckpt
from trainer.checkpoint import (
    COMPLETE,
    DAMAGED,
    Checkpointer,
    CheckpointError,
    export_model,
    list_checkpoints,
    load_exported,
    read_module_state,
    resolve_resume,
)
from trainer.config import EngineConfig
from trainer.engine import Engine
from trainer.models.dalle import DalleConfig, DalleTransformer
from trainer.stages.dalle import make_loss_fn


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

    stale = tmp_path / "ckpt" / ".staging-step-000000007"  # a save killed before its publish leaves this
    (stale / "engine").mkdir(parents=True)
    fresh.train_step(batch(1))
    Checkpointer(root).save(fresh)  # the next save clears the debris and publishes step 2 whole
    assert [info.step for info in list_checkpoints(root)] == [1, 2]
    assert not stale.exists()


def test_fault_mid_upload_to_object_store(s3_moto, monkeypatch):
    root = s3_moto.url("ckpt")
    engine = make_engine()
    engine.train_step(batch(0))
    checkpointer = Checkpointer(root, keep_last=2)
    good = checkpointer.save(engine)
    good_weights = weights(engine)
    engine.train_step(batch(1))

    # Fault injection: the upload dies after two objects, as a killed node would leave it.
    fs, _ = storage.filesystem(root)  # the one instance this process's storage calls use
    uploaded = []
    real_put = fs.put_file

    def flaky_put(local, remote, *args, **kwargs):
        if len(uploaded) == 2:  # not a transient error: storage's retries must not ride it out
            raise RuntimeError("injected: node killed mid-upload")
        uploaded.append(remote)
        return real_put(local, remote, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="injected"):
        patch.setattr(fs, "put_file", flaky_put)
        checkpointer.save(engine)
    assert len(storage.list_files(ckpt.checkpoint_url(root, 2))) >= 1  # partial objects are there
    assert resolve_resume("auto", root) == good
    fresh = make_engine(seed=9)
    assert Checkpointer(root).load(fresh, good)["step"] == 1  # downloaded, verified, loaded
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), good_weights))
    assert all(torch.equal(a, b) for a, b in zip(read_module_state(good).values(), good_weights))


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


# -- hostile, damaged and exported checkpoints ------------------------------------------------------
DALLE = DalleConfig(
    text_vocab_size=40, text_len=6, image_vocab_size=16, image_side=4, depth=2, heads=2, head_dim=8
)


def dalle_engine(zero_stage: int, dtype: str) -> Engine:
    torch.manual_seed(0)
    config = EngineConfig(zero_stage=zero_stage, dtype=dtype, micro_batch_size=2, lr=1e-2, total_steps=4)
    return Engine(DalleTransformer(DALLE), config, make_loss_fn(DALLE))


def dalle_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "text": torch.randint(1, 40, (2, 6), generator=generator),
        "codes": torch.randint(0, 16, (2, 16), generator=generator),
    }


@pytest.fixture(scope="module")
def bf16_zero2(tmp_path_factory):
    """A ZeRO-2 bf16 checkpoint after 3 steps; the oracle is the optimizer's fp32 master copy read live
    through DeepSpeed's safe_get_full_fp32_param, and the bf16 module weights beside it."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = dalle_engine(2, "bf16")
    for step in range(3):
        engine.train_step(dalle_batch(step))
    url = Checkpointer(str(tmp_path_factory.mktemp("bf16") / "ckpt")).save(engine)
    named = list(engine.module.named_parameters())
    master = {name: safe_get_full_fp32_param(param).detach().clone() for name, param in named}
    module = {name: param.detach().clone() for name, param in named}
    return url, master, module


class Payload:
    """What a crafted checkpoint file carries: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "target",
    [
        "engine/mp_rank_00_model_states.pt",
        "engine/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng/rank-00000.json",
    ],
)
@pytest.mark.parametrize("sha", ["fixed-up", "wrong"])
def test_hostile_checkpoint_never_runs_its_payload(bf16_zero2, tmp_path, target, sha):
    url, _, _ = bf16_zero2
    hostile = tmp_path / "ckpt" / "step-000000003"
    shutil.copytree(url, hostile)
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, hostile / target)
    torch.load(hostile / target, weights_only=False)  # the control: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    if sha == "fixed-up":  # the attacker rewrote COMPLETE too: only weights_only / JSON stands in the way
        meta = json.loads((hostile / COMPLETE).read_text())
        meta["files"][target] = sha256_of(hostile / target)
        (hostile / COMPLETE).write_text(json.dumps(meta))
        expected = rf"{target}: (refused|unreadable)"
    else:
        expected = rf"{target}: sha256 \w+\.\.\. does not match"

    if target.startswith("engine/"):
        with pytest.raises(CheckpointError, match="refused|sha256"):
            read_module_state(str(hostile))
    engine = dalle_engine(2, "bf16")
    with pytest.raises(CheckpointError, match=expected):
        Checkpointer(str(hostile.parent)).load(engine, str(hostile))
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies and loads"):
        Checkpointer(str(hostile.parent)).resume(engine, "auto")
    assert not marker.exists()


def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_a_later_save_replaces_it(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    engine = make_engine()
    checkpointer = Checkpointer(root, keep_last=3)
    engine.train_step(batch(0))
    older = checkpointer.save(engine)
    older_weights = weights(engine)
    engine.train_step(batch(1))
    damaged = checkpointer.save(engine)
    model_file = Path(damaged.removeprefix("file://")) / "engine" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated, as a dying disk or upload leaves it

    fresh = make_engine(seed=5)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        state = Checkpointer(root, keep_last=3).resume(fresh, "auto")
    assert state["url"] == older and state["skipped"] == [damaged] and state["step"] == 1
    assert "mp_rank_00_model_states.pt: sha256" in caplog.text and f"resumed from {older}" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), older_weights))
    assert [info.step for info in list_checkpoints(root)] == [1]  # no longer offered to anyone
    assert storage.exists(storage.join(damaged, DAMAGED))

    fresh.train_step(batch(1))
    assert Checkpointer(root, keep_last=3).save(fresh) == damaged  # the same step, saved anew
    assert [info.step for info in list_checkpoints(root)] == [1, 2]
    again = make_engine(seed=6)
    assert Checkpointer(root).resume(again, "auto")["skipped"] == []
    assert all(torch.equal(a, b) for a, b in zip(weights(again), weights(fresh)))


def test_every_file_and_folder_is_fsynced_before_the_complete_marker(tmp_path, monkeypatch):
    # A power cut cannot be produced in a test: record what os.fsync was called on (through the real
    # call) and what had been synced when COMPLETE was written.
    synced: list[str] = []
    real_fsync, real_write = ckpt.os.fsync, ckpt.storage.write_bytes_atomic
    at_marker: list[set[str]] = []

    def recording_fsync(fd: int) -> None:
        synced.append(ckpt.os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def recording_write(url: str, data: bytes) -> None:
        if url.endswith(COMPLETE):
            at_marker.append(set(synced))
        real_write(url, data)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    monkeypatch.setattr(ckpt.storage, "write_bytes_atomic", recording_write)
    engine = make_engine()
    engine.train_step(batch(0))
    url = Checkpointer(str(tmp_path / "ckpt")).save(engine)
    staging = str(tmp_path / "ckpt" / ".staging-step-000000001")
    files = ckpt.read_marker(url).files
    assert {"engine/mp_rank_00_model_states.pt", "rng/rank-00000.json", "trainer_state.json"} <= set(files)
    (before,) = at_marker
    assert {f"{staging}/{name}" for name in files} <= before
    assert {staging, f"{staging}/engine", f"{staging}/rng", str(tmp_path / "ckpt")} <= before


def test_export_and_zero_to_fp32_give_the_fp32_master_copy_of_a_bf16_zero2_run(
    bf16_zero2, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from cluster.cli import main as tessera

    url, master, module = bf16_zero2
    # The master copy is what matters: the bf16 module weights differ from it by rounding.
    assert max(float((module[n].float() - master[n]).abs().max()) for n in master) > 1e-4

    assert tessera(["export", "--checkpoint", url, "--out", str(tmp_path / "m.safetensors")]) == 0
    exported, config = load_exported(str(tmp_path / "m.safetensors"))
    assert config == DALLE.model_dump(mode="json")
    assert set(exported) == set(master)
    assert all(exported[n].dtype == torch.float32 and torch.equal(exported[n], master[n]) for n in master)
    export_model(url, str(tmp_path / "b.safetensors"), "bf16")
    halves = load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(halves[n], master[n].to(torch.bfloat16)) for n in master)

    # DeepSpeed's own script, as DeepSpeed copies it into the checkpoint, finds the tag through `latest`.
    script = Path(url) / "zero_to_fp32.py"
    monkeypatch.setattr(sys, "argv", [str(script), url, str(tmp_path / "ds"), "--safe_serialization"])
    runpy.run_path(str(script), run_name="__main__")
    (output,) = (tmp_path / "ds").glob("*.safetensors")
    theirs = load_file(str(output))
    assert all(torch.equal(theirs[n], master[n]) for n in master)


def test_two_rank_zero2_and_zero3_partitions_read_back_as_the_fp32_master(tmp_path):
    """One 2-rank torchrun launch (gloo, DeepSpeed on CPU); see tests/dist/checkpoint_layouts.py."""
    urls = run_dist_script("checkpoint_layouts.py", tmp_path / "layouts.json", tmp_path)
    for stage, url in urls.items():
        master = torch.load(tmp_path / f"zero{stage}-master.pt", weights_only=True)
        loaded = read_module_state(url)
        assert set(loaded) == set(master), stage
        assert all(torch.equal(loaded[name], master[name]) for name in master), stage
        model = DalleTransformer(DALLE)
        model.load_state_dict(loaded)  # the whole model, from each rank's partition
