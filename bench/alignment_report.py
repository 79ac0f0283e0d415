"""What the judge-alignment benches share: the run header of their JSON and their printed table."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def run_header(benchmark: str) -> dict[str, Any]:
    """The fields every bench JSON starts with: what ran, when, where, on which versions."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),  # pastes back into a shell
        "device": platform.processor() or platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


def print_prompt_alignment(
    results: dict[Any, dict[str, Any]], row_label: str, extra_label: str, extra: Callable[[dict, str], str]
) -> None:
    """One line per result and prompt group (seen, heldout): whole-prompt accuracy, its Wilson 95% interval,
    the prompt count and one bench-specific column (``extra(result, group)``)."""
    print(f"{row_label:<8} {'group':<8} {'prompt accuracy':<16} {'95% CI':<16} {'n':>7} {extra_label:>10}")
    for name, result in results.items():
        for group in ("seen", "heldout"):
            entry = result["alignment"].get(group, {}).get("prompt")
            if entry:
                low, high = entry["ci95"]
                print(
                    f"{name!s:<8} {group:<8} {entry['accuracy']:<16.3f} [{low:.3f}, {high:.3f}]   "
                    f"{entry['total']:>7} {extra(result, group):>10}"
                )
