"""The byte path of one file, in threads: HTTP reads straight into large buffers, positional
writes, and a hasher that follows the written prefix, so receiving, writing and hashing run on
different cores (socket reads, file writes and hashlib all release the GIL on large buffers).

A large file is fetched as several byte ranges at once (HTTP Range, a bounded number of
connections per file and per executor); the sha256 is still computed over the whole file, in
order, as the contiguous written prefix grows. Progress is a checkpoint: the hashed, synced
prefix and its sha256, which the server keeps so that a later attempt on the same storage can
verify the partial file and continue after it instead of starting over."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

BUFFER = 4 << 20  # the most one socket read may bring: per-call Python cost vanishes
HASH_READ = 8 << 20
MIN_CHUNK, MAX_CHUNK = 4 << 20, 64 << 20  # one Range request of a parallel download
MAX_REDIRECTS = 5


class WrongSize(ValueError):
    """The file endpoint sends (or announces) more or fewer bytes than the file's declared size:
    not the declared file, so a final failure, never a download."""


class Upstream(Exception):
    """The file endpoint answered with an error status (retry_after: its Retry-After, seconds)."""

    def __init__(self, status: int, url: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status
        self.retry_after = retry_after


class RangeIgnored(Exception):
    """The file endpoint answered a ranged request with the whole file: fetch it in one stream."""


class Cancelled(Exception):
    """The transfer was stopped from outside (lease lost, shutdown)."""


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Upstream(0, url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = parts.path or "/"
    return conn, target + (f"?{parts.query}" if parts.query else "")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def open_range(
    url: str, headers: dict[str, str], start: int, end: int | None, timeout: float, auth_origin: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """GET bytes start..end (inclusive; None: to the end, no Range header at 0), following
    redirects; returns the connection (the caller closes it), the answer and the URL that gave
    it. The Authorization header goes only to `auth_origin` (the file endpoint): LFS files
    redirect to a CDN, which must not see the hub token."""
    trusted = _origin(auth_origin)
    for _ in range(MAX_REDIRECTS + 1):
        send = {"Accept-Encoding": "identity", **headers}
        if _origin(url) != trusted:
            send.pop("Authorization", None)
        if start or end is not None:
            send["Range"] = f"bytes={start}-{'' if end is None else end}"
        conn, target = _connect(url, timeout)
        try:
            conn.request("GET", target, headers=send)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            url = urljoin(url, response.getheader("Location", ""))
            conn.close()
            continue
        if response.status not in (200, 206):
            retry = _retry_after(response.getheader("Retry-After"))
            conn.close()
            raise Upstream(response.status, url, retry)
        return conn, response, url
    raise Upstream(310, url)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


def check_answer(response: http.client.HTTPResponse, size: int, start: int, end: int) -> None:
    """The answer is exactly bytes start..end of a file of the declared size, or WrongSize."""
    length = response.getheader("Content-Length")
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.getheader("Content-Range", ""))
        if not match or int(match[1]) != start:
            raise WrongSize(f"server answered a range other than bytes {start}-{end}")
        if match[3] != "*" and int(match[3]) != size:
            raise WrongSize(f"server sent a file of {match[3]} bytes, not the declared {size}")
        if int(match[2]) != end:
            raise WrongSize(f"server ended the range at {match[2]}, not {end} (declared size {size})")
    elif start or end != size - 1:
        raise RangeIgnored()
    if length is not None and length.strip().isdigit():
        announced = int(length)
        if response.status == 200 and announced > size:
            raise WrongSize(f"server sent more than the declared {size} bytes (Content-Length {announced})")
        if response.status == 200 and announced < size:
            raise WrongSize(
                f"server sent fewer than the declared {size} bytes ({announced} announced by Content-Length)"
            )


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

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._hashed = self.resume_at
        self._chunks = self._plan()
        self._written = [start for start, _ in self._chunks]
        self._next = 0
        self._error: BaseException | None = None
        self._final_url = self.url

    def _plan(self) -> list[tuple[int, int]]:
        """[start, stop) byte ranges of what is left, in order."""
        left = self.size - self.resume_at
        # Eight chunks per connection: the hashed prefix (what a resume keeps) trails the furthest
        # byte by about 1/8 of the file at most, with few requests per file.
        chunk = min(MAX_CHUNK, max(MIN_CHUNK, self.size // (8 * max(self.connections, 1))))
        if self.connections <= 1 or left < 2 * chunk:
            return [(self.resume_at, self.size)]
        return [(at, min(self.size, at + chunk)) for at in range(self.resume_at, self.size, chunk)]

    # -- progress --------------------------------------------------------------------------
    def checkpoint(self) -> tuple[int, str]:
        """(n, sha256 of the first n bytes), with those bytes synced to disk first."""
        with self._lock:
            n, digest = self._hashed, self.digest.copy()
        os.fdatasync(self.fd)
        return n, digest.hexdigest()

    # -- the fetch -------------------------------------------------------------------------
    def run(self) -> str:
        """Fetch what is left and return the sha256 of the whole file (raises WrongSize,
        RangeIgnored, Upstream, OSError/HTTPException, or Cancelled)."""
        if self.resume_at > self.size:
            raise WrongSize(f"partial file longer than the declared {self.size} bytes")
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
            self._final_url, self.headers, start, None if last else end, self.timeout, self.url
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
                    self._lock.notify_all()
            if pos < stop:
                raise WrongSize(f"server sent fewer than the declared {self.size} bytes ({pos} of them)")
        finally:
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
