"""What `dlw executor run` shows while it works: on a terminal one status line redrawn in place
(total and per-file progress, the current rate); when stderr is not a terminal (a pipe, journald)
one log line every LINE_INTERVAL seconds while there is something to tell. Log records never
share a line with the status line."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import Literal

from app.executor.client import Claimed

Mode = Literal["bar", "lines", "off"]
RATE_WINDOW = 5.0  # seconds the rate averages over: current, and 0 once nothing moved for that long
LINE_INTERVAL = 10.0  # seconds between two progress lines when not on a terminal
BAR_INTERVAL = 0.2  # redrawing per chunk would cost more than it shows
FILES_SHOWN = 3


def where(item: Claimed) -> str:
    """`tenant/repo@rev:path`, the name every line about a file uses."""
    return f"{item.tenant}/{item.repo_id}@{item.revision}:{item.path}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


class Progress:
    def __init__(self, mode: Mode) -> None:
        self.mode: Mode = mode
        self.done = 0
        self.failed = 0
        self._drawn = 0.0
        self._window: deque[tuple[float, int]] = deque()  # (time, bytes) of recent chunks
        self._told: tuple[int, int, int] | None = None  # (done, failed, bytes) at the last line
        self._bytes = 0
        self._lock = threading.Lock()  # add_bytes runs in the transfer threads

    @property
    def enabled(self) -> bool:  # a status line is on the terminal (logs must clear it first)
        return self.mode == "bar"

    def add_bytes(self, n: int, now: float | None = None) -> None:
        """Counts bytes received (from any thread)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._bytes += n
            self._window.append((now, n))

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the last RATE_WINDOW seconds (0 when idle that long)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._window and self._window[0][0] < now - RATE_WINDOW:
                self._window.popleft()
            return sum(n for _, n in self._window) / RATE_WINDOW

    def status(self, active: list[Claimed], now: float | None = None) -> str:
        """The one line both modes print."""
        total = sum(a.size for a in active)
        done = sum(a.bytes_done for a in active)
        width = 20
        filled = int(width * done / total) if total else 0
        pct = f"{100 * done / total:5.1f}%" if total else "  --  "
        files = " ".join(
            f"{a.path.rsplit('/', 1)[-1][:24]} {100 * a.bytes_done / a.size if a.size else 100:.0f}%"
            for a in active[:FILES_SHOWN]
        )
        more = f" +{len(active) - FILES_SHOWN}" if len(active) > FILES_SHOWN else ""
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {pct} {_mb(done)}/{_mb(total)} MB"
            f" {self.rate(now) / 1e6:6.1f} MB/s | {len(active)} active{': ' + files + more if files else ''}"
            f" | {self.done} done {self.failed} failed"
        )

    def due(self) -> bool:
        """Whether draw() would draw now."""
        interval = BAR_INTERVAL if self.mode == "bar" else LINE_INTERVAL
        return self.mode != "off" and time.monotonic() - self._drawn >= interval

    def draw(self, active: list[Claimed], *, force: bool = False) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        interval = BAR_INTERVAL if self.mode == "bar" else LINE_INTERVAL
        if not force and now - self._drawn < interval:
            return
        self._drawn = now
        if self.mode == "bar":
            sys.stderr.write("\r\x1b[K" + self.status(active, now))
            sys.stderr.flush()
            return
        told = (self.done, self.failed, self._bytes)
        if active or told != self._told:  # idle and nothing new: no line
            self._told = told
            logging.getLogger("dlw.executor.progress").info("%s", self.status(active, now))

    def clear(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines clear the progress line first, so the two never share a line."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(sys.stderr)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.clear()
        super().emit(record)


def route_logs_around(progress: Progress) -> None:
    """Replace the root handlers with one that clears the status line before each record,
    keeping the format app/logs.py chose (text or JSON)."""
    if not progress.enabled:
        return
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter), None)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = ProgressAwareHandler(progress)
    handler.setFormatter(formatter or logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
