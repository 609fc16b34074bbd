"""One claimed file's life in the reference executor (app/executor/runner.py runs the loop that
claims them): its download (the small-file lane or a download slot), heartbeats while it runs,
verification and publication in the download's thread, and the report of how it ended."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import httpx

from app.domain import RETRY_AFTER_MAX_SECONDS
from app.executor.batching import Reporter
from app.executor.client import Claimed, ExecutorApi, LeaseLost
from app.executor.download import (
    Busy,
    Downloaded,
    NoCommit,
    NotPublished,
    Tuning,
    Unreachable,
    UnsafePath,
    Upstream,
    WrongSize,
    discard,
    download,
    file_url,
    lane_takes,
    mismatch,
    remove_partial,
)
from app.executor.layout import hub_etag, publish
from app.executor.metrics import ExecutorMetrics
from app.executor.progress import Progress, where
from app.executor.settings import Config

log = logging.getLogger("dlw.executor")

SMALL_FILE = 1 << 20  # below: logged done at debug


class FileWork(abc.ABC):
    """The per-file half of ReferenceExecutor (which sets these attributes and runs the loop)."""

    config: Config
    tuning: Tuning
    slots: asyncio.Semaphore
    reporter: Reporter
    progress: Progress
    metrics: ExecutorMetrics
    hub_headers: dict[str, str]

    fetching: set[str]  # the files not downloaded yet
    _room: asyncio.Event  # set when a download ended
    _counting: threading.Lock

    @property
    @abc.abstractmethod
    def api(self) -> ExecutorApi: ...

    def _fetched(self, file_id: str) -> None:
        """The file's download ended (whatever the outcome): room for the next claim."""
        self.fetching.discard(file_id)
        self._room.set()
        if not self.fetching:  # the last download ended: its completion need not wait for others
            self.reporter.flush()

    def _bytes_counter(self, item: Claimed) -> Callable[[int], None]:
        """A callback for the transfer threads: counts where it runs (the range workers of one
        file count under one lock), without waking the event loop for every read; the loop
        draws from the counts (self._ticker)."""

        def count(n: int) -> None:
            with self._counting:
                item.bytes_done += n
            self.progress.add_bytes(n)
            self.metrics.bytes.inc(n)

        return count

    async def _download(self, item: Claimed) -> Downloaded:
        fetch = functools.partial(
            download,
            self.config.storages,
            self.config.hf_endpoint,
            item,
            self.hub_headers,
            self.tuning,
            self._bytes_counter(item),
            then=functools.partial(self._verify_and_publish, item),
        )
        if lane_takes(self.tuning, item):  # the lane keeps its own --concurrency files at once (it queues the rest)
            return await fetch()
        # Claimed files beyond the download slots wait here, their leases kept by heartbeats.
        async with self.slots:
            return await fetch()

    async def _work(self, item: Claimed) -> None:
        work = asyncio.current_task()
        assert work is not None
        lost = asyncio.Event()
        # Heartbeats start after their first interval: a small file is done long before, and
        # costs no heartbeat task at all. A lost lease cancels this task's download.
        beats: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            self._beat_interval(item),
            lambda: beats.append(asyncio.create_task(self._heartbeats(item, work, lost))),
        )
        try:
            try:
                result: Downloaded = await self._download(item)
            finally:
                self._fetched(item.id)
        except asyncio.CancelledError:
            if lost.is_set():  # our own heartbeat stopped it: the lease is gone, report nothing
                self._lease_lost(item)
                return
            await self._release(item)  # shutting down
            raise
        except Exception as exc:
            if not await self._after_failure(item, exc):
                raise
            return
        finally:
            timer.cancel()
            for task in beats:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if item.resumed_from:
            log.info("%s: resumed at byte %d of %d", where(item), item.resumed_from, item.size)
        # Verified and in place (in the download's thread) before the server hears "succeeded";
        # result.size is the declared size (checked there): the only count the server accepts.
        outcome = await self.reporter.complete(item, result.size, result.sha256, result.place.stored_path)
        self._completed(item, result, outcome)

    async def _after_failure(self, item: Claimed, exc: Exception) -> bool:
        """Report how the file's download failed (a release, or a failure retryable or final);
        False for an exception that is not a download's outcome (the caller raises it)."""
        if isinstance(exc, Busy):  # an expired holder in another process still writes it: not ours yet
            log.warning("%s: %s; given back", where(item), exc)
            await self.api.report(item, "release", {})
        elif isinstance(exc, (UnsafePath, NoCommit, WrongSize)):  # not the declared file, or nowhere for it: final
            await self._fail(item, str(exc), retryable=False)
        elif isinstance(exc, NotPublished):
            await self._fail(item, str(exc), retryable=exc.retryable)
        elif isinstance(exc, Unreachable):
            # Not a root this executor serves: back to the queue as a failed attempt, so another
            # executor serving it may take it, and the task fails with this message once the
            # attempts are spent (a release would come straight back to this executor).
            await self._fail(item, f"executor {self.config.label}: {exc}", retryable=True)
        elif isinstance(exc, Upstream):
            retryable = exc.status >= 500 or exc.status == 429
            await self._fail(item, str(exc), retryable=retryable, retry_after=exc.retry_after)
        elif isinstance(exc, (httpx.HTTPError, OSError)):
            await self._fail(item, f"{type(exc).__name__}: {exc}", retryable=True)
        else:
            return False
        return True

    def _lease_lost(self, item: Claimed) -> None:
        discard(self.config.storages, item)
        log.warning("%s: lease lost (task cancelled or lease expired); partial file discarded", where(item))
        self.metrics.files.labels("lease_lost").inc()

    def _completed(self, item: Claimed, result: Downloaded, outcome: str) -> None:
        """The completion's answer: counted and logged."""
        if outcome not in ("completed", "already_completed"):
            log.warning("%s: complete refused: %s", where(item), outcome)
            return
        self.progress.done += 1
        self.metrics.files.labels("succeeded").inc()
        # A line per file: at info for files that took a while or were placed from a stored
        # copy, at debug for small downloads (hundreds a second would flood the log; the
        # progress line counts them).
        how = f"placed from the stored copy {result.copied_from}" if result.copied_from else "downloaded"
        log.log(
            logging.INFO if result.size >= SMALL_FILE or result.copied_from else logging.DEBUG,
            "%s done (%d bytes, %s)",
            where(item),
            result.size,
            how,
        )

    def _verify_and_publish(self, item: Claimed, result: Downloaded) -> None:
        """In the download's thread, right after the bytes arrived (one hop off the event loop
        per file): the bytes must be the claimed file, then they go into place. Raises
        NotPublished otherwise (a mismatch is final, a failed publication retryable)."""
        problem = mismatch(item, result)
        if problem:
            remove_partial(result.place)
            raise NotPublished(problem, retryable=False)
        try:
            self._publish(item, result)
        except OSError as exc:
            raise NotPublished(f"publishing the file: {type(exc).__name__}: {exc}", retryable=True) from exc

    def _publish(self, item: Claimed, result: Downloaded) -> None:
        """Verified bytes into place; for hf-cache named as huggingface_hub names blobs (the
        hub's ETag, asked with a HEAD like it does)."""
        etag = result.etag  # as the download's first answer gave it; else asked for
        if result.place.link is not None and etag is None:
            headers = dict(self.hub_headers)
            if item.hub_token:
                headers["Authorization"] = f"Bearer {item.hub_token}"
            # Short: bounded well within the lease.
            etag = hub_etag(file_url(self.config.hf_endpoint, item), headers, timeout=min(10.0, item.lease_seconds / 3))
        publish(result.place, item, result.sha256, etag)

    async def _checkpoint_body(self, item: Claimed) -> dict[str, Any]:
        """The partial download's checkpoint (synced prefix and its sha256), when one runs or a
        stop cancelled one (the release then reports where it stopped)."""
        point = item.stopped_at
        if item.transfer is not None:
            try:
                point = await asyncio.to_thread(item.transfer.checkpoint)
            except OSError:
                return {}
        if point is None:
            return {}
        return {"checkpoint_bytes": point[0], "checkpoint_sha256": point[1]}

    def _beat_interval(self, item: Claimed) -> float:
        # Within a third of the lease, and often enough that progress (and the resume point)
        # is current: `GET /tasks/{id}` shows bytes done while the file downloads.
        return max(min(item.lease_seconds / 3, self.config.progress_seconds), 0.2)

    async def _heartbeats(self, item: Claimed, work: asyncio.Task[Any], lost: asyncio.Event) -> None:
        """Started one interval after the claim: a heartbeat, then one every interval. On a lost
        lease, `work` (the file's task, still downloading) is cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            if not await self._beat(item):
                lost.set()
                work.cancel()
                return
            # One interval from this heartbeat's start, not its end: the checkpoint a crash
            # leaves on the server is at most one interval old, however long the request took.
            # A quarter of one at least: a heartbeat slower than the interval (a slow API, a
            # long fdatasync) is not followed at once by the next, which would load both more.
            interval = self._beat_interval(item)
            await asyncio.sleep(max(interval / 4, began + interval - loop.time()))

    async def _beat(self, item: Claimed) -> bool:
        """One heartbeat with the file's progress (and checkpoint, when one runs); False when the
        lease is gone. Another failure is logged: the next heartbeat may get through."""
        try:
            await self.reporter.heartbeat(item, {"bytes_done": item.bytes_done, **await self._checkpoint_body(item)})
        except LeaseLost:
            return False
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("%s: heartbeat failed (%s); retrying", where(item), exc)
        return True

    async def _release(self, item: Claimed) -> None:
        """Back to the queue at once (a stop), with what is on disk as its resume point."""
        await self.api.report(item, "release", await self._checkpoint_body(item))
        self.metrics.files.labels("released").inc()

    async def _fail(self, item: Claimed, error: str, *, retryable: bool, retry_after: float | None = None) -> None:
        if not retryable:  # a final failure leaves nothing behind; a retryable one keeps its resume point
            discard(self.config.storages, item)
        self.progress.failed += 1
        self.metrics.files.labels("failed_retryable" if retryable else "failed_final").inc()
        log.warning("%s: %s (%s)", where(item), error, "retryable" if retryable else "final")
        body: dict[str, Any] = {"error": error[:2000], "retryable": retryable}
        if retryable and retry_after is not None:  # the server keeps the wait, for every executor
            body["retry_after_seconds"] = min(math.ceil(retry_after), RETRY_AFTER_MAX_SECONDS)
        await self.api.report(item, "fail", body)
