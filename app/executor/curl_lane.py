"""Small files through libcurl (pycurl's multi interface), many at once in one thread.

Why: with http.client each small file cost about 350 us of Python (request building, header
parsing through the email package, URL splitting) in a worker thread, and eight such threads
fought over the GIL: 500 files of 2 KB took about three times as long as `curl --parallel`.
libcurl does the HTTP work in C, keeps connections alive in the multi handle's cache and runs
all transfers from one thread, so what is left in Python per file is opening the partial file,
one write callback per received block, and publishing (bench/executor.py).

What a transfer here guarantees is what app/executor/transfer.py guarantees for one stream:
only http and https (redirects too, at most MAX_REDIRECTS); the Authorization header only to the
host that was asked (libcurl drops it on a redirect to another host, scheme or port); no proxy
from the environment; bytes hashed as they are written; never a byte past the declared size
(the transfer stops there, WrongSize) and WrongSize for fewer; an error status as Upstream with
its Retry-After. Used for files below INLINE_BELOW without a resume point (app/executor/download.py
decides); larger ones are fetched in parallel ranges by Transfer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import selectors
import ssl
import threading
import time
from collections import deque
from typing import Any, TypeVar

import pycurl

from app.executor.curl_outcomes import TransferError, answer_problem, curl_problem
from app.executor.http_ranges import MAX_REDIRECTS, Cancelled, WrongSize
from app.executor.lane_transfer import LaneTransfer

log = logging.getLogger("dlw.executor")

T = TypeVar("T")
_HTTP = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
_BREAKS = re.compile("[\r\n\0]")


def ca_bundle() -> str | None:
    """The certificates https is verified against: the ones Python's ssl module uses (the system
    store, or SSL_CERT_FILE), so both byte paths trust the same authorities."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile if paths.cafile and os.path.isfile(paths.cafile) else None


class CurlLane:
    """A thread running one libcurl multi handle. Files are submitted from the event loop; at most
    `max_active` are transferred at once (the rest wait in order), over at most `max_connections`
    connections. Results reach the event loop in batches, one wake-up for all the files that
    ended in one turn of the lane (a wake-up per file cost more than the file's transfer)."""

    def __init__(self, max_active: int, max_connections: int, timeout: float = 60.0) -> None:
        self.max_active = max_active
        self.max_connections = max_connections
        self.timeout = timeout
        self._incoming: deque[LaneTransfer[Any]] = deque()
        self._ended: list[tuple[LaneTransfer[Any], Any, BaseException | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleeping = False
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._broken = False  # the lane's thread failed: files take the threaded path instead
        self._cainfo = ca_bundle()

    def submit(self, transfer: LaneTransfer[T]) -> asyncio.Future[T]:
        """Queue the transfer (called in the event loop's thread); the future gives its result."""
        loop = asyncio.get_running_loop()
        transfer.future = loop.create_future()
        with self._lock:
            if self._closing or self._broken:
                raise RuntimeError("the transfer lane is closed")
            self._loop = loop
            self._incoming.append(transfer)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="curl-lane", daemon=True)
                self._thread.start()
            wake, self._sleeping = self._sleeping, False
        if wake:  # a lane that is busy sees the queue at its next turn
            self._wake()
        return transfer.future

    @property
    def usable(self) -> bool:
        return not (self._closing or self._broken)

    def cancel(self, transfer: LaneTransfer[Any]) -> None:
        """Stop the transfer (its future then raises Cancelled); its partial file is kept."""
        transfer.cancelled = True
        self._wake()

    def close(self) -> None:
        """Refuse new files, wait for the lane to finish those it holds, free its pipe. A second
        call does nothing (closing the pipe's descriptors twice could close files opened since)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join()
        with self._lock:  # a late cancel() then writes to no descriptor, not to a reused one
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        os.close(wake_r)
        os.close(wake_w)

    def _wake(self) -> None:
        with self._lock:  # close() swaps the descriptor out under it
            if self._wake_w < 0:
                return
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    # -- the lane's thread -----------------------------------------------------------------
    def _run(self) -> None:
        """libcurl's socket interface on an epoll selector (no FD_SETSIZE limit, no fd set
        rebuilt per turn): libcurl says which sockets to watch and when to call it again."""
        multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, self.max_connections)
        watch = selectors.DefaultSelector()
        watch.register(self._wake_r, selectors.EVENT_READ)
        due: list[float | None] = [None]  # when libcurl wants to be called again (M_TIMERFUNCTION)

        def on_socket(what: int, fd: int, _multi: object, _data: object) -> None:
            if what == pycurl.POLL_REMOVE:
                with contextlib.suppress(KeyError, ValueError):
                    watch.unregister(fd)
                return
            events = (selectors.EVENT_READ if what & pycurl.POLL_IN else 0) | (
                selectors.EVENT_WRITE if what & pycurl.POLL_OUT else 0
            )
            try:
                watch.modify(fd, events)
            except KeyError:
                watch.register(fd, events)

        def on_timer(ms: int) -> None:
            due[0] = None if ms < 0 else time.monotonic() + ms / 1000

        multi.setopt(pycurl.M_SOCKETFUNCTION, on_socket)
        multi.setopt(pycurl.M_TIMERFUNCTION, on_timer)
        active: dict[pycurl.Curl, LaneTransfer[Any]] = {}
        idle: list[pycurl.Curl] = []
        problem: BaseException = Cancelled()
        try:
            while True:
                self._admit(multi, active, idle)
                for handle, transfer in list(active.items()):
                    if transfer.cancelled and transfer.why is None:  # stalled: no callback would see it
                        transfer.why = Cancelled()
                        self._end(multi, handle, active, idle, transfer.why)
                self._collect(multi, active, idle)
                self._deliver()
                with self._lock:
                    if self._closing and not active and not self._incoming:
                        return
                    # Asleep (woken by a submission) unless queued files could start now.
                    self._sleeping = sleep = not (self._incoming and len(active) < self.max_active)
                when = due[0]
                wait = 0.0 if not sleep else 1.0 if when is None else min(max(when - time.monotonic(), 0.0), 1.0)
                ready = watch.select(wait)
                with self._lock:
                    self._sleeping = False
                for key, mask in ready:
                    if key.fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        continue
                    flags = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                        pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0
                    )
                    multi.socket_action(key.fd, flags)
                when = due[0]
                if when is not None and when <= time.monotonic():
                    due[0] = None
                    multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        except BaseException as exc:  # a bug here must not leave the files' waiters hanging
            log.exception("the small-file lane stopped")
            problem = TransferError(f"the small-file lane stopped: {type(exc).__name__}: {exc}")
            with self._lock:
                self._broken = True
        finally:
            for handle in list(active):
                try:
                    self._end(multi, handle, active, idle, problem)
                except BaseException:  # settled all the same; the others still must be
                    log.exception("the small-file lane could not end a transfer")
            with self._lock:
                left, self._incoming = list(self._incoming), deque()
            for transfer in left:
                self._settle(transfer, None, problem)
            self._deliver()
            for handle in idle:
                handle.close()
            multi.close()
            watch.close()

    def _settle(self, transfer: LaneTransfer[Any], result: Any, problem: BaseException | None) -> None:
        self._ended.append((transfer, result, problem))

    def _deliver(self) -> None:
        """Hand this turn's outcomes to the event loop, all in one call."""
        if not self._ended:
            return
        ended, self._ended = self._ended, []
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_resolve, ended)

    def _admit(
        self, multi: pycurl.CurlMulti, active: dict[pycurl.Curl, LaneTransfer[Any]], idle: list[pycurl.Curl]
    ) -> None:
        while len(active) < self.max_active:
            with self._lock:
                if not self._incoming:
                    return
                transfer = self._incoming.popleft()
            if transfer.cancelled:
                self._settle(transfer, None, Cancelled())
                continue
            try:
                transfer.fd, transfer.discard = transfer.start()
            except BaseException as exc:  # Busy, UnsafePath, OSError...: the file's outcome
                self._settle(transfer, None, exc)
                continue
            handle: pycurl.Curl | None = None
            try:
                handle = idle.pop() if idle else self._new_handle()
                self._configure(handle, transfer)
                multi.add_handle(handle)
            except (pycurl.error, ValueError, TypeError) as exc:  # this file's, not the lane's
                if handle is not None:
                    handle.close()
                os.close(transfer.fd)
                self._settle(transfer, None, TransferError(f"transfer not started: {exc}"))
                continue
            active[handle] = transfer

    def _new_handle(self) -> pycurl.Curl:
        """A handle with what every transfer of the lane shares, set once (the options stay on
        the handle between transfers; setting them all again per small file cost a microsecond
        each): only http and https (redirects too, at most MAX_REDIRECTS), errors as failures,
        no proxy from the environment (as http.client), the timeouts, the CA bundle."""
        handle = pycurl.Curl()
        handle.setopt(pycurl.PROTOCOLS, _HTTP)
        handle.setopt(pycurl.REDIR_PROTOCOLS, _HTTP)
        handle.setopt(pycurl.FOLLOWLOCATION, 1)
        handle.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        handle.setopt(pycurl.FAILONERROR, 1)
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.PROXY, "")
        handle.setopt(pycurl.CONNECTTIMEOUT, max(1, int(self.timeout)))
        handle.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        handle.setopt(pycurl.LOW_SPEED_TIME, max(1, int(self.timeout)))
        if self._cainfo is not None:
            handle.setopt(pycurl.CAINFO, os.fsencode(self._cainfo))  # a path as bytes: any name the OS takes
        return handle

    def _configure(self, handle: pycurl.Curl, transfer: LaneTransfer[Any]) -> None:
        """What is this transfer's own; every one of these is set for every transfer, so nothing
        of the handle's last transfer is left."""
        # libcurl sends header lines as given: a line break in one would be a header of its own
        # (http.client refuses those too).
        if _BREAKS.search("".join(transfer.headers)):
            raise ValueError("a request header contains a line break or NUL")
        handle.setopt(pycurl.URL, transfer.url)
        handle.setopt(pycurl.HTTPHEADER, [*transfer.headers, "Accept-Encoding: identity"])
        # An announced Content-Length above the size stops before any byte (0: no limit).
        handle.setopt(pycurl.MAXFILESIZE_LARGE, transfer.size)
        handle.setopt(pycurl.WRITEFUNCTION, transfer.write)
        # None unsets the callback (and its data: libcurl then drops the headers); pycurl takes
        # None here since 7.45.7 (pinned in pyproject.toml).
        handle.setopt(pycurl.HEADERFUNCTION, transfer.header if transfer.want_etag else None)

    def _collect(
        self, multi: pycurl.CurlMulti, active: dict[pycurl.Curl, LaneTransfer[Any]], idle: list[pycurl.Curl]
    ) -> None:
        while True:
            queued, done, failed = multi.info_read()
            for handle in done:
                transfer = active[handle]
                self._end(multi, handle, active, idle, transfer.why or answer_problem(handle, transfer))
            for handle, code, message in failed:
                transfer = active[handle]
                self._end(multi, handle, active, idle, transfer.why or curl_problem(handle, transfer, code, message))
            if not queued:
                return

    def _end(
        self,
        multi: pycurl.CurlMulti,
        handle: pycurl.Curl,
        active: dict[pycurl.Curl, LaneTransfer[Any]],
        idle: list[pycurl.Curl],
        problem: BaseException | None,
    ) -> None:
        transfer = active.pop(handle)
        # The file gets an outcome whatever happens here (a failure below stops the lane).
        outcome: tuple[Any, BaseException | None] = (None, TransferError("the small-file lane stopped"))
        try:
            multi.remove_handle(handle)
            handle.setopt(pycurl.WRITEFUNCTION, _discard)  # drop the references to the transfer
            handle.setopt(pycurl.HEADERFUNCTION, None)
            idle.append(handle)
            try:
                if problem is None:
                    os.fsync(transfer.fd)
            except OSError as exc:
                problem = exc
            finally:
                os.close(transfer.fd)
            if isinstance(problem, WrongSize) and transfer.discard is not None:
                transfer.discard()  # not the declared file: nothing to resume
            if problem is not None:
                outcome = (None, problem)
                return
            try:
                outcome = (transfer.finish(transfer.digest.hexdigest(), transfer.etag), None)
            except BaseException as exc:  # NotPublished and the like: the file's outcome
                outcome = (None, exc)
        finally:
            self._settle(transfer, *outcome)


def _discard(_data: bytes) -> None:
    return None


def _resolve(ended: list[tuple[LaneTransfer[Any], Any, BaseException | None]]) -> None:
    """In the event loop: each transfer's future gets its outcome (unless its waiter gave up)."""
    for transfer, result, problem in ended:
        future = transfer.future
        if future is None or future.done():
            continue
        if problem is None:
            future.set_result(result)
        else:
            future.set_exception(problem)
