"""Docs figures agree with bench/results/*.json: `bench/report.py` writes them, `--check` catches drift.

No benchmark runs here: the script only reads the committed JSON and the docs (each call ~0.2 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--root", str(root), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_of_docs_and_results(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def test_committed_docs_match_the_committed_benchmark_json():
    result = report(ROOT, "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_changed_result_makes_its_blocks_stale_until_regenerated(tmp_path):
    root = copy_of_docs_and_results(tmp_path)
    path = root / "bench" / "results" / "trainer_overhead.json"
    overhead = json.loads(path.read_text())
    overhead |= {"plain_median_ms": 740.0, "engine_median_ms": 755.0}  # the drift issue 8 found
    path.write_text(json.dumps(overhead))

    stale = report(root, "--check")
    assert stale.returncode == 1
    assert "docs/training.md: trainer-overhead" in stale.stdout
    assert "docs/benchmarks.md: summary" in stale.stdout

    assert report(root).returncode == 0
    assert report(root, "--check").returncode == 0
    assert (
        "| tessera Engine (DeepSpeed ZeRO-0) | 755.0 | 1.020 |" in (root / "docs" / "training.md").read_text()
    )
    assert "755.0 ms vs 740.0 ms per step: **1.020x**" in (root / "docs" / "benchmarks.md").read_text()


def test_a_hand_edited_figure_is_caught(tmp_path):
    root = copy_of_docs_and_results(tmp_path)
    sampling = json.loads((root / "bench" / "results" / "sampling.json").read_text())
    figure = f"**{sampling['speedup_cache_over_no_cache']:.1f}x**"
    doc = root / "docs" / "benchmarks.md"
    assert figure in doc.read_text()
    doc.write_text(doc.read_text().replace(figure, "**30.0x**"))
    stale = report(root, "--check")
    assert stale.returncode == 1 and stale.stdout.strip() == "stale: docs/benchmarks.md: summary"


def test_gpu_figures_without_json_read_unmeasured(tmp_path):
    root = copy_of_docs_and_results(tmp_path)
    (root / "bench" / "results" / "attention.json").unlink(missing_ok=True)
    assert report(root).returncode == 0
    row = next(
        line for line in (root / "docs" / "benchmarks.md").read_text().splitlines() if "attention" in line
    )
    assert "**unmeasured**" in row


def test_a_removed_block_is_an_error(tmp_path):
    """Deleting the markers (to paste figures by hand) fails the check instead of passing silently."""
    root = copy_of_docs_and_results(tmp_path)
    doc = root / "docs" / "training.md"
    doc.write_text(doc.read_text().replace("bench-report:trainer-overhead", "hand-written"))
    result = report(root, "--check")
    assert result.returncode == 2 and "no generated block trainer-overhead" in result.stderr
