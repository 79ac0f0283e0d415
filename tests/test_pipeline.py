"""``tessera pipeline`` on a local Ray: a tiny four-stage graph runs, a rerun skips everything, and a
changed config reruns exactly that stage and its dependants. Stages are the real commands (ingest on
Ray, tokenizer, dvae and dalle through DeepSpeed) with a couple of steps each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main as tessera
from cluster.pipeline import load_preset, plan, stage_env, stages_sharing_cores
from trainer.tracking import find_finished_runs, read_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "engine.total_steps=2", "--set", "engine.warmup_steps=0", "--set", "run.checkpoint_every=2"]
TINY += ["--set", "run.eval_every=2"]


def write_preset(root: Path) -> Path:
    """Copies of the tiny stage configs with their run folders under ``root``, and a graph over them."""
    dvae = (
        (REPO / "configs/dvae/tiny.toml")
        .read_text()
        .replace('name = "dvae-tiny"', f'name = "dvae-tiny"\nrun_dir = "{root}/dvae"')
    )
    (root / "dvae.toml").write_text(dvae)
    dalle = (REPO / "configs/dalle/tiny.toml").read_text()
    dalle = dalle.replace('name = "dalle-tiny"', f'name = "dalle-tiny"\nrun_dir = "{root}/dalle"')
    dalle = dalle.replace('dvae_config = "configs/dvae/tiny.toml"', f'dvae_config = "{root}/dvae.toml"')
    (root / "dalle.toml").write_text(dalle)
    preset = f"""
name = "test"
[vars]
data = "{root}/data"
[stages.ingest]
argv = ["ingest", "--config", "configs/ingest/tiny.toml", "--source", "synthetic", "--num-samples", "96",
        "--dest", "{{data}}", "--run-dir", "{root}/ingest"]
[stages.tokenizer]
after = ["ingest"]
argv = ["tokenizer", "train", "--manifest", "{{data}}", "--vocab-size", "300"]
[stages.dvae]
after = ["ingest"]
argv = ["train", "dvae", "--config", "{root}/dvae.toml", "--set", "data.manifest={{data}}",
        {", ".join(map(json.dumps, TINY))}, "--set", "data.validation_batch_size=8"]
[stages.dalle]
after = ["tokenizer", "dvae"]
argv = ["train", "dalle", "--config", "{root}/dalle.toml", "--set", "data.manifest={{data}}",
        "--set", "data.tokenizer={{data}}/tokenizer.json", "--set", "model.text_vocab_size=300",
        {", ".join(map(json.dumps, TINY))}, "--set", "data.validation_batch_size=4"]
"""
    (root / "pipeline.toml").write_text(preset)
    return root / "pipeline.toml"


def run_pipeline(preset: Path, run_dir: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert tessera(["pipeline", "--preset", str(preset), "--run-dir", str(run_dir), *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


@pytest.mark.slow
def test_pipeline_runs_skips_and_reruns_only_what_changed(tmp_path, monkeypatch, capsys, ray_local):
    monkeypatch.chdir(REPO)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    preset = write_preset(tmp_path)

    first = run_pipeline(preset, tmp_path / "p1", capsys)
    assert first["ran"] == ["ingest", "tokenizer", "dvae", "dalle"] and first["skipped"] == []
    assert (tmp_path / "dalle" / "checkpoints").is_dir()

    second = run_pipeline(preset, tmp_path / "p2", capsys)
    assert second["ran"] == [] and second["skipped"] == ["dalle", "dvae", "ingest", "tokenizer"]

    # A changed dalle config reruns dalle only; a changed dVAE config would rerun dvae and dalle.
    dalle = tmp_path / "dalle.toml"
    changed = re.sub(r"(?m)^lr = .*$", "lr = 2e-4", dalle.read_text(), count=1)
    assert changed != dalle.read_text()
    dalle.write_text(changed)
    third = run_pipeline(preset, tmp_path / "p3", capsys)
    assert third["ran"] == ["dalle"] and third["skipped"] == ["dvae", "ingest", "tokenizer"]
    dvae = tmp_path / "dvae.toml"
    dvae.write_text(dvae.read_text().replace("seed = 0", "seed = 1", 1))
    actions = {p.name: p.action for p in plan(load_preset(str(preset)), {}, tracking_uri=uri)}
    assert actions == {"ingest": "skip", "tokenizer": "skip", "dvae": "run", "dalle": "run"}
    forced = {
        p.name: p.action for p in plan(load_preset(str(preset)), {}, start="tokenizer", tracking_uri=uri)
    }
    assert forced == {"ingest": "out of scope", "tokenizer": "run", "dvae": "out of scope", "dalle": "run"}

    # Each executed stage is an MLflow run nested under its pipeline run, keyed and with its log.
    newest, oldest = (
        read_run(uri, r) for r in find_finished_runs(uri, "tessera-pipeline", {"pipeline.stage": "dalle"})
    )
    stage_run = newest
    assert newest.data.tags["pipeline.key"] != oldest.data.tags["pipeline.key"]  # the dalle config changed
    parent = read_run(uri, stage_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["pipeline.preset"] == "test"
    assert "tessera train dalle" in stage_run.data.tags["pipeline.command"]


def test_a_cycle_or_unknown_stage_is_refused(tmp_path):
    cyclic = tmp_path / "cyclic.toml"
    cyclic.write_text(
        'name = "c"\n[stages.a]\nargv = ["plan"]\nafter = ["b"]\n[stages.b]\nargv = ["plan"]\nafter = ["a"]\n'
    )
    with pytest.raises(Exception, match="cycle"):
        load_preset(str(cyclic))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('name = "u"\n[stages.a]\nargv = ["plan"]\nafter = ["nope"]\n')
    with pytest.raises(Exception, match="unknown stages"):
        load_preset(str(unknown))


def test_a_stage_starting_alone_gets_every_core():
    """Nothing running and one stage ready: no other stage can become ready before it finishes."""
    assert stages_sharing_cores(running=0, launching=1, max_parallel=2) == 1
    assert stages_sharing_cores(running=0, launching=2, max_parallel=2) == 2  # two start together
    assert stages_sharing_cores(running=1, launching=1, max_parallel=2) == 2  # beside a running one
    assert stages_sharing_cores(running=0, launching=1, max_parallel=4) == 1


@pytest.mark.parametrize("max_parallel", [1, 2])
def test_parallel_stages_split_the_cores_between_their_torch_thread_pools(max_parallel):
    """torch sizes its pool from OMP_NUM_THREADS at import: a stage's process must start with it."""
    cpus = os.cpu_count() or 1
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"MASTER_PORT": "29999"}
    env = stage_env(environ, "sqlite:///x.db", max_parallel, cpus)
    assert "MASTER_PORT" not in env and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    seen = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(seen) == max(1, cpus // max_parallel)
    assert stage_env(environ, "u", 2, 16)["OMP_NUM_THREADS"] == "8"
    assert stage_env(environ, "u", 4, 2)["OMP_NUM_THREADS"] == "1"
    assert stage_env(environ | {"OMP_NUM_THREADS": "3"}, "u", 2, 16)["OMP_NUM_THREADS"] == "3"  # caller's
