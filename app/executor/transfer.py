"""The byte path of one file, in threads: HTTP reads straight into large buffers, positional
writes, and a hasher that follows the written prefix, so receiving, writing and hashing run on
different cores (socket reads, file writes and hashlib all release the GIL on large buffers).

A large file is fetched as several byte ranges at once (HTTP Range, a bounded number of
connections per file and per executor); the sha256 is still computed over the whole file, in
order, as the contiguous written prefix grows. Progress is a checkpoint: the hashed, synced
prefix and its sha256, which the server keeps so that a later attempt on the same storage can
verify the partial file and continue after it instead of starting over."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.executor.http_ranges import (
    MAX_REDIRECTS,
    Cancelled,
    ConnectionPool,
    RangeIgnored,
    Upstream,
    WrongSize,
    check_answer,
    open_range,
)

__all__ = [
    "INLINE_BELOW",
    "MAX_REDIRECTS",
    "Cancelled",
    "ConnectionPool",
    "RangeIgnored",
    "Transfer",
    "Upstream",
    "WrongSize",
    "hash_prefix",
]

BUFFER = 4 << 20  # the most one socket read may bring: per-call Python cost vanishes
HASH_READ = 8 << 20
MIN_CHUNK, MAX_CHUNK = 4 << 20, 64 << 20  # one Range request of a parallel download
INLINE_BELOW = 8 << 20  # smaller files (or what is left of them) are fetched and hashed in one thread


@dataclass
class Transfer:
    """One file's fetch into `fd` (opened by the caller), from `resume_at` with the hash of the
    prefix before it in `digest`.

    What is left is cut into chunks taken in order by up to `connections` workers, one Range
    request each (after the first, at the URL the first request was redirected to). The
    contiguous written prefix, which the hasher follows and checkpoints report, therefore trails
    the furthest byte by at most `connections` chunks. One connection: a single stream."""

    url: str
    headers: dict[str, str]
    fd: int
    size: int
    resume_at: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    connections: int = 1
    slots: threading.BoundedSemaphore | None = None  # the executor-wide connection cap
    timeout: float = 60.0
    on_bytes: Callable[[int], None] = lambda _n: None
    cancel: threading.Event = field(default_factory=threading.Event)
    pool: ConnectionPool = field(default_factory=ConnectionPool)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        # Held by the hasher from a digest update until the byte count includes it, so that a
        # checkpoint never pairs a count with a digest of more bytes (a resume point that never
        # matches: the next attempt started over, one kill in about six in the bench's harness).
        # Taken before _lock, never inside it.
        self._hash_lock = threading.Lock()
        # Held by a checkpoint across its fdatasync, and by close_fd: a checkpoint never syncs a
        # descriptor its caller closed (or one reused since, another file's) after the transfer.
        self._fd_lock = threading.Lock()
        self._fd_open = True
        self._hashed = self.resume_at
        self._chunks = self._plan()
        self._written = [start for start, _ in self._chunks]
        self._next = 0
        self._error: BaseException | None = None
        self._final_url = self.url
        self._hash_inline = False
        self.first_answer: dict[str, str] = {}  # the first request's ETag (hf-cache names blobs by it)

    def _plan(self) -> list[tuple[int, int]]:
        """[start, stop) byte ranges of what is left, in order."""
        left = self.size - self.resume_at
        # Thirty-two chunks per connection: the hashed prefix (what a resume keeps) trails the
        # furthest byte by about 1/32 of the file (at least MIN_CHUNK per connection); with eight
        # per connection a kill at half the file lost a fifth of what had been fetched (the bench's
        # resume row read 0.60 against its < 0.6 target). The price, on a link with a long round
        # trip: a connection idles one round trip per chunk (ranges are not pipelined), e.g. 4 MiB
        # at 50 MB/s over 100 ms runs at about half its speed; loopback (the bench) cannot show it.
        chunk = min(MAX_CHUNK, max(MIN_CHUNK, self.size // (32 * max(self.connections, 1))))
        if self.connections <= 1 or left < 2 * chunk:
            return [(self.resume_at, self.size)]
        return [(at, min(self.size, at + chunk)) for at in range(self.resume_at, self.size, chunk)]

    # -- progress --------------------------------------------------------------------------
    def checkpoint(self) -> tuple[int, str]:
        """(n, sha256 of the first n bytes), with those bytes synced to disk first."""
        with self._hash_lock, self._lock:
            n, digest = self._hashed, self.digest.copy()
        with self._fd_lock:
            if not self._fd_open:
                raise OSError(errno.EBADF, "the transfer's partial file is closed")
            os.fdatasync(self.fd)
        return n, digest.hexdigest()

    def close_fd(self) -> None:
        """The caller is about to close or truncate `fd`: checkpoints raise OSError from now on
        (one that is syncing finishes first)."""
        with self._fd_lock:
            self._fd_open = False

    # -- the fetch -------------------------------------------------------------------------
    def run(self) -> str:
        """Fetch what is left and return the sha256 of the whole file (raises WrongSize,
        RangeIgnored, Upstream, OSError/HTTPException, or Cancelled)."""
        if self.resume_at > self.size:
            raise WrongSize(f"partial file longer than the declared {self.size} bytes")
        if self.size - self.resume_at < INLINE_BELOW:
            return self._run_inline()
        hasher = threading.Thread(target=self._hash_loop, name="hasher", daemon=True)
        hasher.start()
        # The first chunk is fetched here (it learns the redirect target); more workers start
        # once it answered, each waiting for a slot of the executor-wide cap.
        extra = min(self.connections, len(self._chunks)) - 1
        self._first_answered = threading.Event()
        workers = [threading.Thread(target=self._worker, args=(True,), daemon=True) for _ in range(extra)]
        starter = threading.Thread(target=self._start_later, args=(workers,), daemon=True)
        starter.start()
        self._worker(False)
        starter.join()
        for worker in workers:
            if worker.ident is not None:
                worker.join()
        hasher.join()
        if self._error is not None:
            raise self._error
        if self._hashed != self.size:
            raise WrongSize(f"server sent fewer than the declared {self.size} bytes ({self._hashed})")
        os.fsync(self.fd)
        return str(self.digest.hexdigest())

    def _run_inline(self) -> str:
        """A small file: one stream, hashed as it arrives, in this thread (no helper threads:
        for small files their start-up would cost more than the overlap gains)."""
        self._hash_inline = True
        self._first_answered = threading.Event()
        self._chunk(0)
        if self._hashed != self.size:
            raise WrongSize(f"server sent fewer than the declared {self.size} bytes ({self._hashed})")
        os.fsync(self.fd)
        return str(self.digest.hexdigest())

    def _start_later(self, workers: list[threading.Thread]) -> None:
        while not self._first_answered.wait(0.2):
            if self.cancel.is_set():
                return
        for worker in workers:
            if self.cancel.is_set():
                return
            worker.start()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
            self.cancel.set()
            self._lock.notify_all()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= len(self._chunks) or self.cancel.is_set():
                return None
            self._next += 1
            return self._next - 1

    def _worker(self, capped: bool) -> None:
        try:
            if capped and self.slots is not None:
                while not self.slots.acquire(timeout=0.2):
                    if self.cancel.is_set():
                        return
            try:
                while (index := self._take()) is not None:
                    self._chunk(index)
            finally:
                if capped and self.slots is not None:
                    self.slots.release()
        except BaseException as exc:  # handed to run() in the calling thread
            self._fail(exc)
        finally:
            self._first_answered.set()

    def _chunk(self, index: int) -> None:
        start, stop = self._chunks[index]
        if start >= stop and self.size:
            return  # nothing left of a non-empty file (an empty one is still asked for: it must exist)
        # The last chunk asks for the file's end and reads one byte past the declared size if
        # offered: a longer body is refused, never written.
        last = index == len(self._chunks) - 1
        end = stop - 1
        conn, response, answered_at = open_range(
            self._final_url,
            self.headers,
            start,
            None if last else end,
            self.timeout,
            self.url,
            self.pool,
            self.first_answer if index == 0 else None,
        )
        if index == 0:
            self._final_url = answered_at  # later ranges skip the redirect
            self._first_answered.set()
        try:
            check_answer(response, self.size, start, end)
            pos = start
            while True:
                if self.cancel.is_set():
                    raise Cancelled()
                want = min(BUFFER, stop - pos + (1 if last else 0))
                if want <= 0:
                    break
                # read1: what one socket read brings (up to `want`), so a slow sender still shows
                # progress and a cancel is seen between reads.
                data = response.read1(want)
                got = len(data)
                if not got:
                    break
                if pos + got > stop:
                    raise WrongSize(f"server sent more than the declared {self.size} bytes")
                os.pwrite(self.fd, data, pos)
                pos += got
                self.on_bytes(got)
                with self._lock:
                    self._written[index] = pos
                    if self._hash_inline:
                        self.digest.update(data)
                        self._hashed = pos
                    self._lock.notify_all()
            if pos < stop:
                raise WrongSize(f"server sent fewer than the declared {self.size} bytes ({pos} of them)")
            if response.length == 0:
                response.read()  # ends the answer (read1 does not), so the connection can be reused
        except BaseException:
            conn.close()
            raise
        if response.isclosed() and not response.will_close:
            self.pool.put(answered_at, conn)  # read to its end: the connection can carry the next file
        else:
            conn.close()

    def _hash_loop(self) -> None:
        """Hash the written prefix in order, reading it back from the page cache."""
        try:
            for index, (_start, stop) in enumerate(self._chunks):
                while self._hashed < stop:
                    with self._lock:
                        while self._written[index] <= self._hashed and self._error is None and not self.cancel.is_set():
                            self._lock.wait(0.5)
                        if self._error is not None or self.cancel.is_set():
                            return
                        upto = self._written[index]
                    while self._hashed < upto:
                        data = os.pread(self.fd, min(HASH_READ, upto - self._hashed), self._hashed)
                        if not data:
                            raise WrongSize("partial file shrank while hashing")
                        with self._hash_lock:
                            self.digest.update(data)
                            with self._lock:
                                self._hashed += len(data)
        except BaseException as exc:  # handed to run()
            self._fail(exc)


def hash_prefix(fd: int, length: int) -> Any:
    """sha256 state after the first `length` bytes of the open file (to check a resume point)."""
    digest = hashlib.sha256()
    done = 0
    while done < length:
        data = os.pread(fd, min(HASH_READ, length - done), done)
        if not data:
            raise WrongSize("partial file shorter than its checkpoint")
        digest.update(data)
        done += len(data)
    return digest
