"""The executor's progress: per-file and total progress, a rate that is current (zero once idle),
one line per interval when not on a terminal, and the tenant/repo@rev:path name of every file."""

from __future__ import annotations

import logging

import pytest

from app.executor import progress as progress_module
from app.executor.client import Claimed
from app.executor.progress import RATE_WINDOW, Progress, where


def claimed(path: str, size: int, done: int) -> Claimed:
    return Claimed(
        id=path, tenant="acme", repo_id="org/model", revision="v1", path=path, size=size, sha256=None,
        token="secret-assignment-token", lease_seconds=60, bytes_done=done,
    )  # fmt: skip


def test_total_and_per_file_progress_and_a_current_rate():
    p = Progress("off")
    files = [claimed("weights/a.bin", 1_000_000, 500_000), claimed("b.bin", 3_000_000, 0)]
    p.add_bytes(5_000_000, now=100.0)
    line = p.status(files, now=100.0)
    assert "12.5%" in line and "0.5/4.0 MB" in line and "2 active: a.bin 50% b.bin 0%" in line
    assert f"{5 / RATE_WINDOW:6.1f} MB/s" in line
    # Idle for longer than the window: the rate is 0, not the average since the start.
    assert p.rate(now=100.0 + RATE_WINDOW + 0.1) == 0
    assert "0.0 MB/s" in p.status(files, now=100.0 + RATE_WINDOW + 0.1)
    assert "secret-assignment-token" not in line


def test_failure_and_success_lines_name_the_file_alike():
    assert where(claimed("dir/x.bin", 1, 0)) == "acme/org/model@v1:dir/x.bin"


def test_not_a_terminal_one_line_per_interval_while_there_is_news(monkeypatch: pytest.MonkeyPatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    p = Progress("lines")
    files = [claimed("a.bin", 10, 5)]
    with caplog.at_level(logging.INFO, logger="dlw.executor.progress"):
        p.draw(files)
        p.draw(files)  # within the interval: nothing
        clock[0] += progress_module.LINE_INTERVAL
        p.draw(files)
        clock[0] += progress_module.LINE_INTERVAL
        p.draw([])  # idle, but nothing new since the last line: nothing
    lines = [r.getMessage() for r in caplog.records if r.name == "dlw.executor.progress"]
    assert len(lines) == 2 and all("1 active: a.bin 50%" in line for line in lines)
