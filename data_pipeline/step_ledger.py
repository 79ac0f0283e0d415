"""The sample ledger on disk: per rank, one JSONL line per applied training step, and its committed reading.

A training rank appends a line once a step's update has been applied (never before: a step that crashed
half-way changed nothing). The line names the samples the step consumed, the epoch, the rank, the
process id and the step that process resumed from (its *attempt*).

Semantics across a failure: a restarted attempt resumes from the newest checkpoint C, so the weights
of every step after C are lost, and the loader (restored from C) hands those steps' samples out again.
The earlier attempt's lines for steps after C describe updates that no longer exist: reading the
ledger rolls them back. What remains counts *committed* steps only - each step once, from the attempt
whose update the final weights contain - and that is what exactly-once delivery is checked on. The
rolled-back deliveries are reported beside it (they are the re-deliveries a restart costs).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.ledger import SampleLedger, sample_id

LEDGER_DIR = "ledger"


def ledger_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, LEDGER_DIR, f"rank-{rank:05d}.jsonl")


class StepLedgerWriter:
    """Appends one line per applied step for one rank (a local run folder: lines are appended)."""

    def __init__(self, run_dir: str, rank: int, resumed_from_step: int) -> None:
        if "://" in run_dir and not run_dir.startswith("file://"):
            raise ValueError(f"the sample ledger needs a local run folder, not {run_dir!r}")
        path = ledger_path(run_dir.removeprefix("file://"), rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.rank, self.resumed_from_step = rank, resumed_from_step
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def record(self, step: int, epoch: int, batch: dict[str, Any]) -> None:
        """Log the batch's valid rows as delivered by ``step``; flushed, so a killed process keeps it."""
        samples = [
            list(sample_id(url, key))
            for url, key, valid in zip(batch["__url__"], batch["__key__"], batch["valid"].tolist())
            if valid
        ]
        line = {
            "step": step,
            "epoch": epoch,
            "rank": self.rank,
            "pid": os.getpid(),
            "resumed_from_step": self.resumed_from_step,
            "samples": samples,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class LedgerReading:
    """The committed deliveries, plus what restarts rolled back."""

    committed: SampleLedger = field(default_factory=SampleLedger)
    rolled_back: int = 0  # sample deliveries in steps a restart replayed
    attempts: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # rank -> [(pid, resumed_from)]
    steps: dict[int, list[int]] = field(default_factory=dict)  # rank -> committed steps, in order


def read_lines(run_dir: str, rank: int) -> list[dict[str, Any]]:
    """One rank's ledger lines in the order written (a torn last line from a killed writer is dropped)."""
    lines = []
    with open(ledger_path(run_dir, rank), encoding="utf-8") as handle:
        for text in handle:
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines


def read_committed(run_dir: str) -> LedgerReading:
    """Every rank's ledger with replayed steps rolled back (see the module docstring)."""
    reading = LedgerReading()
    folder = os.path.join(run_dir, LEDGER_DIR)
    ranks = sorted(int(name[5:10]) for name in os.listdir(folder) if name.startswith("rank-"))
    for rank in ranks:
        kept: dict[int, dict[str, Any]] = {}
        attempts = reading.attempts.setdefault(rank, [])
        for line in read_lines(run_dir, rank):
            attempt = (line["pid"], line["resumed_from_step"])
            if not attempts or attempts[-1] != attempt:
                attempts.append(attempt)
                for step in [s for s in kept if s > attempt[1]]:  # this attempt replays these
                    reading.rolled_back += len(kept.pop(step)["samples"])
            if line["step"] in kept:
                raise ValueError(f"rank {rank}: step {line['step']} logged twice by attempt {attempt}")
            kept[line["step"]] = line
        reading.steps[rank] = sorted(kept)
        for line in kept.values():
            counter = reading.committed.counts.setdefault((line["epoch"], rank), Counter())
            counter.update(tuple(sid) for sid in line["samples"])
    return reading
