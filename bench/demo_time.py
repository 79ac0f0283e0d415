"""Benchmark: the wall time of `tessera demo` from nothing, stage by stage (the budget is 10 minutes).

Runs the demo in a fresh copy of the repository's tracked files (so an existing ``runs/`` is neither
reused nor touched), with this venv's ``tessera``, and reads the pipeline's own per-stage times from
its log. Records the 1-minute load average before and after (another job on the box slows every
stage). Writes ``bench/results/demo_time.json``; ``python bench/report.py`` renders it into the README.
Usage: ``python bench/demo_time.py [--note "..."]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"pipeline: (?P<stage>[\w-]+) finished in (?P<seconds>\d+) s")
BUDGET_S = 600


def copy_tracked(dest: Path) -> str:
    """The repository's tracked files (as in the working tree) under ``dest``; returns HEAD's commit."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_time.json")
    args = parser.parse_args(argv)
    tessera = Path(sys.executable).parent / "tessera"
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        commit = copy_tracked(Path(tmp))
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.run([str(tessera), "demo"], cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"tessera demo failed (exit {proc.returncode})")
    stages = {m["stage"]: int(m["seconds"]) for m in STAGE_LINE.finditer(output)}
    print("| stage | seconds |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in stages.items()))
    print(f"tessera demo: {seconds:.0f} s wall ({len(stages)} stages), budget {BUDGET_S} s")
    report = {
        "benchmark": "demo_time",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/demo_time.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": f"{platform.machine()}, {os.cpu_count()} cores, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "code": {"commit": commit},
        "note": args.note,
        "load_average_1min": {"before": load_before, "after": load_after},
        "wall_seconds": round(seconds, 1),
        "budget_seconds": BUDGET_S,
        "stage_seconds": stages,
        "excludes": "make install (venv, DeepSpeed op build): a once-per-machine cost",
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
