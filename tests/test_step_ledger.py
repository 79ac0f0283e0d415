"""The on-disk sample ledger: steps replayed after a restart are rolled back, the rest counted once."""

from __future__ import annotations

import os

import pytest
import torch

from data_pipeline.step_ledger import StepLedgerWriter, ledger_path, read_committed

SHARD = "/data/shard-00000-0000.tar"


def batch(*keys: str, padding: int = 0) -> dict:
    return {
        "__url__": [SHARD] * (len(keys) + padding),
        "__key__": [*keys, *[f"pad{i}" for i in range(padding)]],
        "valid": torch.tensor([True] * len(keys) + [False] * padding),
    }


@pytest.fixture
def write(monkeypatch, tmp_path):
    """Log steps as one attempt of a rank; ``pid`` stands for the attempt's process."""

    def write(rank: int, resumed_from: int, steps: dict[int, tuple[str, ...]], pid: int) -> None:
        monkeypatch.setattr(os, "getpid", lambda: pid)
        writer = StepLedgerWriter(str(tmp_path), rank, resumed_from_step=resumed_from)
        for step, keys in steps.items():
            writer.record(step, 0, batch(*keys, padding=1))
        writer.close()

    return write


def test_a_restart_rolls_back_the_steps_it_replays(write, tmp_path):
    # Attempt 1 ran steps 1-3 and died; the newest checkpoint was step 2, so attempt 2 replays step 3.
    write(0, 0, {1: ("a", "b"), 2: ("c", "d"), 3: ("e", "f")}, pid=100)
    write(0, 2, {3: ("e", "f"), 4: ("g", "h")}, pid=200)
    reading = read_committed(str(tmp_path))
    assert reading.steps == {0: [1, 2, 3, 4]} and reading.attempts == {0: [(100, 0), (200, 2)]}
    assert reading.rolled_back == 2  # step 3's two samples, delivered again after the restart
    expected = {(os.path.basename(SHARD), key) for key in "abcdefgh"}
    reading.committed.check_exactly_once(expected, epoch=0)  # padding rows are not deliveries


def test_a_replay_that_hands_out_other_samples_is_caught(write, tmp_path):
    # A loader that did not restore its position replays step 3 with the epoch's first samples.
    write(0, 0, {1: ("a", "b"), 2: ("c", "d"), 3: ("e", "f")}, pid=100)
    write(0, 2, {3: ("a", "b"), 4: ("c", "d")}, pid=200)
    expected = {(os.path.basename(SHARD), key) for key in "abcdefgh"}
    with pytest.raises(AssertionError, match="missing.*duplicated"):
        read_committed(str(tmp_path)).committed.check_exactly_once(expected, epoch=0)


def test_a_torn_last_line_is_dropped_and_a_repeated_step_is_an_error(write, tmp_path):
    write(1, 0, {1: ("a",), 2: ("b",)}, pid=100)
    write(1, 0, {2: ("b",)}, pid=100)  # the same attempt logging step 2 again: a loop bug
    with pytest.raises(ValueError, match="step 2 logged twice"):
        read_committed(str(tmp_path))
    write(0, 0, {1: ("a",), 2: ("b",)}, pid=100)
    with open(ledger_path(str(tmp_path), 0), "a") as handle:
        handle.write('{"step": 3, "epo')  # the writer was killed mid-line
    os.remove(ledger_path(str(tmp_path), 1))
    assert read_committed(str(tmp_path)).steps == {0: [1, 2]}
