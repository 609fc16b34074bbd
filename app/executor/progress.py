"""The terminal status line of `dlw executor run`, and log output that does not collide with it."""

from __future__ import annotations

import logging
import sys
import time

from app.executor.client import Claimed


class Progress:
    """One status line on a terminal: files in flight, bytes, rate. Silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self._last = 0.0
        self._started = time.monotonic()
        self._bytes = 0

    def add_bytes(self, n: int) -> None:
        self._bytes += n

    def draw(self, active: list[Claimed], *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:  # redrawing per chunk would cost more than it shows
            return
        self._last = now
        total = sum(a.size for a in active)
        done = sum(a.bytes_done for a in active)
        width = 24
        filled = int(width * done / total) if total else 0
        rate = self._bytes / max(now - self._started, 1e-6) / 1e6
        bar = "#" * filled + "." * (width - filled)
        pct = f"{100 * done / total:5.1f}%" if total else "  --  "
        line = (
            f"[{bar}] {pct} {done / 1e6:8.1f}/{total / 1e6:.1f} MB  {len(active)} active"
            f"  {self.done} done  {self.failed} failed  {rate:6.1f} MB/s"
        )
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
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
    """Replace the root handlers with one that clears the status line before each record."""
    if not progress.enabled:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = ProgressAwareHandler(progress)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
