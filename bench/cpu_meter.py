"""CPU seconds of a loader's processes: this one and every process below it, live or already reaped."""

from __future__ import annotations

import contextlib

import psutil


def tree_cpu_seconds(exclude: frozenset[int] = frozenset()) -> float:
    """user + system CPU of this process and its live descendants, plus what their reaped children used.

    A worker that exited and was waited for is in its parent's ``children_*`` times, so the difference
    of two calls is the CPU the tree used in between (DataLoader workers, a Ray cluster started from
    here and its workers, a tool run as a subprocess). ``exclude``: pids that are not the loader's
    (an object store started as a child) and their descendants.
    """
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if process.pid in exclude or any(p.pid in exclude for p in process.parents()):
                continue
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total
