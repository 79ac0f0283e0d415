"""First contact with the CLI: path and storage errors are one line and exit 2, found before any work."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import cluster.launch
from cluster import cli, environment
from data_pipeline.manifest import Manifest, SourceLineage, save_manifest
from trainer.net import free_port


@pytest.fixture
def no_launch(monkeypatch):
    """Preflight must fail before training starts: reaching the launcher is a test failure."""

    def launched(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(cluster.launch, "launch", launched)


@pytest.fixture
def manifest(tmp_path) -> str:
    """A valid (empty) manifest: the inputs after it are what a test gets wrong."""
    source = SourceLineage(spec="none", kind="folder")
    return save_manifest(
        Manifest(source=source, image_size=32, num_samples=0, total_bytes=0, shards=[]), str(tmp_path / "ds")
    )


def train(tmp_path, *settings: str, debug: bool = False) -> int:
    args = ["--debug"] if debug else []
    args += ["train", "dvae", "--run-dir", str(tmp_path / "run")]
    for setting in settings:
        args += ["--set", setting]
    return cli.main(args)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.usefixtures("no_launch")
def test_missing_inputs_are_one_line_and_exit_2(tmp_path, manifest, capsys):
    assert train(tmp_path, f"data.manifest={tmp_path}/nowhere") == 2
    assert re.fullmatch(
        r"tessera: ManifestError: .*nowhere/manifest\.json: no manifest there.*", one_line(capsys)
    )
    assert train(tmp_path, f"data.manifest={manifest}", f"run.resume={tmp_path}/ckpt/step-9") == 2
    assert one_line(capsys).startswith(
        f"tessera: FileNotFoundError: run.resume: {tmp_path}/ckpt/step-9 does not exist"
    )
    tokenizer = f"data.tokenizer={tmp_path}/tok.json"
    assert train(tmp_path, f"data.manifest={manifest}", tokenizer) == 2
    assert "data.tokenizer" in one_line(capsys)
    # An unwritable destination: a run folder below a plain file (root ignores permission bits).
    (tmp_path / "file").write_text("")
    assert train(tmp_path, f"data.manifest={manifest}", f"run.checkpoint_dir={tmp_path}/file/ckpt") == 2
    assert one_line(capsys).startswith(
        f"tessera: PermissionError: run.checkpoint_dir: cannot create {tmp_path}/file/ckpt"
    )
    # --debug shows where it came from.
    assert train(tmp_path, f"data.manifest={tmp_path}/nowhere", debug=True) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.usefixtures("no_launch")
def test_unreachable_object_store_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")
    monkeypatch.setenv("TESSERA_STORAGE_RETRY_S", "0.5")
    assert train(tmp_path, "data.manifest=s3://bucket/ds") == 2
    line = one_line(capsys)
    assert "Could not connect to the endpoint URL" in line and "s3://bucket/ds/manifest.json" in line
    assert "planted-secret" not in line


def test_unknown_field_suggestion_and_help_config(tmp_path, capsys):
    assert train(tmp_path, "data.manifest=x", "engine.lrr=1") == 2
    assert "field 'engine.lrr': unknown field; did you mean engine.lr?" in capsys.readouterr().err
    assert cli.main(["train", "dvae", "--help-config"]) == 0
    assert "dvae.kl_weight = 6.6" in capsys.readouterr().out.splitlines()


def test_cli_and_makefile_share_one_torch_extension_cache(monkeypatch):
    """A hand-run `tessera` must find the comm op `make install` built: one folder for both."""
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    exported = re.search(r"^export TORCH_EXTENSIONS_DIR \?= (.+)$", makefile, re.M).group(1)
    assert Path(exported.replace("$(HOME)", str(Path.home()))) == environment.EXTENSIONS_DIR
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    environment.configure()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(environment.EXTENSIONS_DIR)
    assert "cluster.environment" in makefile  # `make install` prebuilds the op there


def test_makefile_torch_index_is_a_choice_for_cpu_installs_only():
    """`make install TORCH_INDEX_URL=...` points only the CPU torch install at that index (dry run)."""
    root = Path(__file__).parents[1]

    def recipe(*variables: str) -> str:
        return subprocess.run(
            ["make", "-n", "-B", "install", *variables], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    index = "https://download.pytorch.org/whl/cpu"
    chosen = [line for line in recipe(f"TORCH_INDEX_URL={index}").splitlines() if "--index-url" in line]
    assert len(chosen) == 1 and f"torch==2.13.0 --index-url {index}" in chosen[0]
    assert "then .venv/bin/python -m pip install -q torch; " in recipe(f"TORCH_INDEX_URL={index}")  # GPU
    assert "--index-url" not in recipe()  # default: pip's own index


def test_ingest_checks_source_and_destination_before_ray(tmp_path, monkeypatch, capsys):
    import cluster.runtime

    def started(*args, **kwargs):
        raise AssertionError("Ray started before the ingest paths were checked")

    monkeypatch.setattr(cluster.runtime, "init_ray", started)
    assert cli.main(["ingest", "--source", str(tmp_path / "photos"), "--dest", str(tmp_path / "ds")]) == 2
    assert one_line(capsys).startswith(
        f"tessera: FileNotFoundError: ingest.source: {tmp_path}/photos does not exist"
    )
    (tmp_path / "photos").mkdir()
    (tmp_path / "file").write_text("")
    assert (
        cli.main(["ingest", "--source", str(tmp_path / "photos"), "--dest", str(tmp_path / "file" / "ds")])
        == 2
    )
    assert one_line(capsys).startswith("tessera: PermissionError: ingest.dest: cannot create")
