"""The real Ray Train path: TorchTrainer, 2 CPU workers over gloo, DeepSpeed ZeRO-2, checkpoints on Ceph."""

from __future__ import annotations

from cluster.launch import launch
from tests import test_dvae
from trainer.checkpoint import checkpoint_url, list_checkpoints
from trainer.stages import dvae as stage

synthetic_32 = test_dvae.synthetic_32  # the module-scoped ingest fixture, shared
tiny_config = test_dvae.tiny_config


def test_ray_train_zero2_checkpoints_to_ceph_and_resumes(ray_local, s3_ceph, synthetic_32, tmp_path):
    checkpoints = s3_ceph.url("dvae-ray")
    settings = {
        "engine.zero_stage": 2,
        "engine.micro_batch_size": 8,
        "engine.total_steps": 4,
        "engine.warmup_steps": 1,
        "run.checkpoint_every": 2,
        "run.eval_every": 4,
        "run.checkpoint_dir": checkpoints,
    }
    first = launch(
        stage.train,
        tiny_config(synthetic_32, tmp_path / "run", **settings),
        mode="ray",
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
    )
    assert first["world_size"] == 2 and first["steps"] == 4 and first["resumed_from"] is None
    # Rank 0's result came back through Ray, not through a file in the driver's run folder (a driver
    # joining a remote cluster shares no folder with the workers).
    assert not [
        path for path in (tmp_path / "ray").rglob("*") if path.name in ("result.json", "checkpoint.pkl")
    ]
    assert [info.step for info in list_checkpoints(checkpoints)] == [2, 4]

    second = launch(
        stage.train,
        tiny_config(synthetic_32, tmp_path / "run", **{**settings, "engine.total_steps": 6}),
        mode="ray",
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
    )
    assert second["resumed_from"] == checkpoint_url(checkpoints, 4)
    assert second["start_step"] == 4 and second["steps"] == 6
    assert [info.step for info in list_checkpoints(checkpoints)] == [4, 6]
