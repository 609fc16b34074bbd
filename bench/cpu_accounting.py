"""CPU accounting for the benchmarks from /proc: a process's CPU seconds, the whole PostgreSQL
cluster's (backends come and go: BackendSampler), this process's children, and how busy the
machine is (QuietWaiter waits for a quiet moment before a measured cell).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------
# CPU accounting from /proc (clock ticks: 10 ms resolution, fine over seconds)
# ------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on (state is [0])


def process_cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_s(postmaster: int) -> float:
    """CPU of the postmaster, its live children and its reaped children (exited backends)."""
    fields = _stat(postmaster)
    total = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for pid in _children(postmaster):
        try:
            child = _stat(pid)
        except OSError:
            continue
        total += int(child[11]) + int(child[12])
    return total / CLK_TCK


def _children(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == parent:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


class BackendSampler(threading.Thread):
    """CPU of the dlw_app backends (the connections serving the benchmark's requests), sampled
    every 50 ms so that backends which exit during the cell (pgbench's) still count."""

    def __init__(self, postmaster: int) -> None:
        super().__init__(daemon=True)
        self.postmaster = postmaster
        self.stopping = threading.Event()
        self.baseline: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.is_backend: dict[int, bool] = {}
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        for pid in _children(self.postmaster):
            try:
                if pid not in self.is_backend:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    self.is_backend[pid] = b"dlw_app" in title
                if not self.is_backend[pid]:
                    continue
                fields = _stat(pid)
            except OSError:
                continue
            ticks = int(fields[11]) + int(fields[12])
            if initial:
                self.baseline[pid] = ticks
            self.last[pid] = ticks

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self._sample()

    def finish(self) -> float:
        self.stopping.set()
        self.join()
        self._sample()
        return sum(t - self.baseline.get(pid, 0) for pid, t in self.last.items()) / CLK_TCK


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class QuietWaiter:
    """Before a cell, wait (within a budget for the whole run) until the machine is nearly idle:
    other work on a shared 2-core machine, or autovacuum catching up after the previous cell,
    would otherwise be measured as part of the next cell."""

    def __init__(self, budget_s: float, threshold: float = 0.25, max_per_cell_s: float = 5.0) -> None:
        self.budget_s, self.threshold, self.max_per_cell_s = budget_s, threshold, max_per_cell_s
        self.waited_s = 0.0

    def wait(self) -> None:
        start = time.monotonic()
        while True:
            b0 = machine_busy()
            time.sleep(0.25)
            b1 = machine_busy()
            busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
            elapsed = time.monotonic() - start
            if busy < self.threshold or elapsed >= self.max_per_cell_s or self.waited_s + elapsed >= self.budget_s:
                break
        self.waited_s += time.monotonic() - start


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
