"""One file as the small-file lane (app/executor/curl_lane.py) carries it: what to fetch, where
its bytes go (written and hashed as they arrive, never past the declared size) and what becomes
of them; libcurl's write and header callbacks land here."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.executor.http_ranges import Cancelled, WrongSize

__all__ = ["LaneTransfer"]

T = TypeVar("T")


@dataclass(eq=False)
class LaneTransfer(Generic[T]):
    """One file in the lane. `start` (in the lane's thread) opens the partial file and returns its
    descriptor and how to remove it (bytes that are not the file); `finish(sha256, etag)` turns
    the complete, synced bytes into the result.
    `etag`: what the first answer (before any redirect) said in X-Linked-Etag or ETag, asked for
    with want_etag (hf-cache names blobs by it, as huggingface_hub does from its HEAD)."""

    url: str
    headers: list[str]
    size: int
    start: Callable[[], tuple[int, Callable[[], None]]]
    finish: Callable[[str, str | None], T]
    on_bytes: Callable[[int], None]
    want_etag: bool = False
    future: asyncio.Future[T] | None = None  # set by submit, in the event loop's thread
    cancelled: bool = False
    fd: int = -1
    discard: Callable[[], None] | None = None
    written: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    why: BaseException | None = None  # set by a callback that stopped the transfer
    hops: int = 0
    etag: str | None = None

    def write(self, data: bytes) -> int | None:
        """libcurl's write callback: returning 0 aborts the transfer (why says why)."""
        if self.cancelled:
            self.why = Cancelled()
            return 0
        if self.written + len(data) > self.size:
            self.why = WrongSize(f"server sent more than the declared {self.size} bytes")
            return 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.why = exc
            return 0
        self.digest.update(data)
        self.written += len(data)
        self.on_bytes(len(data))
        return None

    def header(self, line: bytes) -> None:
        """libcurl's header callback (hf-cache only): the first answer's ETag."""
        if line.startswith(b"HTTP/"):
            self.hops += 1
        elif self.hops == 1 and b":" in line:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"x-linked-etag" or (key == b"etag" and self.etag is None):
                self.etag = value.strip().decode("latin-1")
