"""Benchmark: the digits preset end to end. Does DALL-E draw the digit its caption asks for?

Runs ``tessera pipeline --preset digits`` from scratch in its own folder (data, runs and a fresh MLflow
store, so no stage is skipped and nothing is resumed), then reads the eval's ``report.json``: the share
of DALL-E samples the digits judge reads as the asked digit (``alignment.all.digit``, Wilson 95%), beside
the same judge on the real eval scans (the ceiling a perfect generator would reach: the ratio is the
comparison) and on the dVAE's reconstructions of them; the judge's held-out digit accuracy (verdicts
count only at or above its bar); the contamination check's clean share; and each stage's wall time.
Writes ``bench/results/digits_preset.json``; ``python bench/report.py`` renders it into docs/dalle.md.

    .venv/bin/python bench/digits_preset.py                 # about 6 minutes on an idle 2-core CPU
    .venv/bin/python bench/digits_preset.py --report DIR    # record a finished run (DIR as --work was)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESET = "digits"
CONFIG_KINDS = ("pipeline", "ingest", "dvae", "dalle", "judge", "eval")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-digits", help="emptied first")
    parser.add_argument("--report", type=Path, help="only record the finished run in this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "digits_preset.json")
    return parser.parse_args(argv)


def pipeline_command(work: Path) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "tessera"),
        "pipeline",
        "--preset",
        PRESET,
        "--var",
        f"store={work}/data",
        "--var",
        f"runs={work}/runs",
        "--run-dir",
        f"{work}/pipeline",
    ]


def run_pipeline(work: Path) -> dict:
    """The pipeline's summary (stages run, seconds each), its stdout's last JSON object."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    started = time.monotonic()
    done = subprocess.run(pipeline_command(work), cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the digits pipeline failed (exit {done.returncode}); logs in {work}/pipeline/logs")
    stdout = "\n" + done.stdout
    summary = json.loads(stdout[stdout.rindex("\n{") + 1 :])
    summary["measured_seconds"] = round(time.monotonic() - started, 1)
    (work / "pipeline-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def digit_share(scores: dict) -> dict:
    """``alignment.all.digit`` of one model's (or the data's) scores on the full eval set."""
    return scores["full"]["alignment"]["all"]["digit"]


def record(work: Path, summary: dict) -> dict:
    report = json.loads((work / "runs" / "eval-digits" / "report.json").read_text())
    ((manifest, section),) = report["manifests"].items()
    contamination = report["contamination"][manifest]
    shares = {
        "real_eval_scans": digit_share(section["data"]),
        "dvae_reconstructions": digit_share(section["models"]["dvae"]),
        "dalle_samples": digit_share(section["models"]["dalle"]),
    }
    return {
        "benchmark": "digits_preset",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU only)",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "configs": [f"configs/{kind}/digits.toml" for kind in CONFIG_KINDS],
        "judge": {**report["judge"], "heldout_samples": section["eval_samples"]},
        "eval_samples": section["eval_samples"],
        "clean_samples": contamination["clean_samples"],
        "digit_alignment": shares,
        "dalle_vs_real": shares["dalle_samples"]["accuracy"] / shares["real_eval_scans"]["accuracy"],
        "dalle_memorisation": {
            key: value
            for key, value in section["models"]["dalle"]["memorisation"].items()
            if key.endswith("_mean") or key.startswith(("feature_fraction", "pixel_fraction"))
        },
        "stage_seconds": summary["seconds"],
        "total_seconds": summary.get("total_seconds", summary.get("measured_seconds")),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.report or args.work
    summary = json.loads((work / "pipeline-summary.json").read_text()) if args.report else run_pipeline(work)
    result = record(work, summary)
    print(f"{'images':<22} {'show the asked digit':<21} {'Wilson 95%':<16} {'n':>4}")
    for name, share in result["digit_alignment"].items():
        low, high = share["ci95"]
        print(f"{name:<22} {share['accuracy']:<21.3f} [{low:.3f}, {high:.3f}] {share['total']:>5}")
    print(f"judge held-out digit accuracy {result['judge']['heldout_accuracy']['digit']:.4f}")
    print("stage seconds:", result["stage_seconds"], "total", result["total_seconds"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
