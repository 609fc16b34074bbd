"""The run loop of the reference executor (behaviour in app/executor/__init__.py): claim while
slots are free, one task per file with its heartbeats, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from app.domain import CLAIM_MAX_FILES, CLAIM_WAIT_SECONDS_MAX, RETRY_AFTER_MAX_SECONDS
from app.executor.batching import Reporter
from app.executor.client import Claimed, ExecutorApi, LeaseLost, TokenRefused
from app.executor.curl_lane import CurlLane
from app.executor.deletion_work import claim_and_carry_out
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
)
from app.executor.layout import hub_etag, publish
from app.executor.metrics import ExecutorMetrics
from app.executor.progress import BAR_INTERVAL, Mode, Progress, route_logs_around, where
from app.executor.settings import Config, config_from

log = logging.getLogger("dlw.executor")

USER_AGENT = "dlw-reference-executor"
DELETIONS_PER_CLAIM = 4  # each takes a moment (unlinks): a few per turn of the loop
DELETIONS_BUSY_SECONDS = 1.0  # asked for at most this often while files download (a request each)
QUEUE_MAX = 2 * CLAIM_MAX_FILES  # files held waiting or downloading, at most (small files)
SMALL_FILE = 1 << 20  # below: logged done at debug


class ReferenceExecutor:
    def __init__(self, config: Config, *, progress: Mode | None = None) -> None:
        self.config = config
        self.progress = Progress(progress or ("bar" if sys.stderr.isatty() else "lines"))
        self.metrics = ExecutorMetrics()
        self.stopping = asyncio.Event()
        self.active: dict[str, tuple[Claimed, asyncio.Task[None]]] = {}  # held: downloading, waiting, reporting
        self.fetching: set[str] = set()  # of those, the files not downloaded yet
        self._room = asyncio.Event()  # a download ended
        self._typical_size = 0  # mean declared size of the last claim's files
        self._counting = threading.Lock()
        self._api: ExecutorApi | None = None
        self.reporter: Reporter
        self.hub_headers = {"User-Agent": USER_AGENT}
        if config.hf_token:
            self.hub_headers["Authorization"] = f"Bearer {config.hf_token}"  # dropped on cross-origin redirects
        self.tuning = Tuning(
            connections_per_file=config.connections_per_file,
            slots=threading.BoundedSemaphore(config.max_connections),
            lane=CurlLane(config.concurrency, config.max_connections),
        )
        self.slots = asyncio.Semaphore(config.concurrency)
        self.exit_code = 0

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: no more claims; giving back %d file(s) in flight", len(self.active))
            self.stopping.set()

    @property
    def api(self) -> ExecutorApi:
        assert self._api is not None, "only while run() holds the clients"
        return self._api

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        headers = {"Authorization": f"Bearer {self.config.token}", "User-Agent": USER_AGENT}
        for root in self.config.storages:
            root.mkdir(parents=True, exist_ok=True)
        # One worker thread per download slot (asyncio's default pool is min(32, cores + 4)),
        # plus a few for checkpoints and file operations.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(self.config.concurrency + 4))
        async with httpx.AsyncClient(
            base_url=self.config.base_url, headers=headers, timeout=30, trust_env=False
        ) as api:
            self._api = ExecutorApi(api)
            self.reporter = Reporter(api, more_coming=lambda: bool(self.fetching))
            self.reporter.start()
            log.info(
                "executor %s: claiming from %s, files from %s, into %s",
                self.config.label,
                self.config.base_url,
                self.config.hf_endpoint,
                ", ".join(str(root) for root in self.config.storages),
            )
            ticker = asyncio.create_task(self._ticker())
            try:
                await self._loop()
            finally:
                ticker.cancel()
                await self._shutdown()
                self.progress.clear()
        return self.exit_code

    def _queue_target(self) -> int:
        """How many files to hold waiting or downloading: --prefetch, or more while the files are
        small (their declared sizes, as the last claim returned them, fitting --prefetch-bytes), so
        a stream of small files is claimed up to claim_max_files at a time, not a few per claim."""
        if not self._typical_size:
            return self.config.prefetch
        by_bytes = self.config.prefetch_bytes // self._typical_size
        return int(max(self.config.prefetch, min(QUEUE_MAX, by_bytes)))

    async def _loop(self) -> None:
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        next_claim = 0.0  # after a claim that drained the queue: not before the poll interval
        next_deletions = 0.0  # after a deletion claim that found none: not before the poll interval
        try:
            while not self.stopping.is_set():
                claimed = asked = 0
                target = self._queue_target()
                free = min(target - len(self.fetching), CLAIM_MAX_FILES)
                # Claim in batches (half the target at least, unless idle): one claim per file
                # freed would cost a transaction per small file. Only files still to download
                # count: a file waiting for its completion report no longer needs a slot, so the
                # next claim arrives while the last ones are reported.
                # An idle executor's claim waits on the server for work (a long poll of the poll
                # interval, in whole seconds, at least 1): a new task starts at once, not at the
                # next poll.
                idle = not self.fetching
                waited = False
                if free > 0 and (free >= (target + 1) // 2 or idle) and (idle or time.monotonic() >= next_claim):
                    asked = free
                    wait = min(max(1, round(self.config.poll_seconds)), CLAIM_WAIT_SECONDS_MAX) if idle else 0
                    got = await self._claimed("claim", functools.partial(self._claim, free, wait))
                    if got is None:
                        break
                    claimed, waited = got, wait > 0
                    if claimed < asked:
                        next_claim = time.monotonic() + self.config.poll_seconds
                # Deletions of tasks' files (docs/storage.md, "Deleting"): quick, done in turn; asked
                # again at once while there were some, else after the poll interval, or a second
                # while files download (not on every turn: a stream of small files turns this loop
                # many times a second).
                deleted = 0
                if time.monotonic() >= next_deletions:
                    got = await self._claimed("deletion claim", self._deletions)
                    if got is None:
                        break
                    deleted = got
                    if not deleted:  # while files download, at most once a second: housekeeping can wait
                        pause = max(self.config.poll_seconds, DELETIONS_BUSY_SECONDS if self.fetching else 0)
                        next_deletions = time.monotonic() + pause
                # Claim again at once while the queue gave all it was asked for and there is room
                # (or deletions came); else wait for a download to finish, a stop, or the poll interval.
                more = claimed == asked > 0 and len(self.fetching) < self._queue_target()
                if not deleted and not more and not (waited and not claimed):  # a waited claim waited already
                    self._room.clear()
                    room = asyncio.ensure_future(self._room.wait())
                    try:
                        await asyncio.wait(
                            {stop_wait, room}, timeout=self.config.poll_seconds, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        room.cancel()
                self._draw()
        finally:
            stop_wait.cancel()

    async def _claimed(self, what: str, claim: Callable[[], Awaitable[int]]) -> int | None:
        """How many items the claim took (0 when the API could not be reached: asked again later),
        or None when the API refuses this executor's token: the executor then stops (exit 3)."""
        try:
            return await claim()
        except TokenRefused as exc:
            log.error("the API refuses this executor's token (%s): mint a new one; stopping", exc)
            self.exit_code = 3
            self.stop()
            return None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("%s failed: %s", what, exc)
            return 0

    async def _claim(self, free: int, wait: int = 0) -> int:
        files = await self.api.claim(free, self.config.lease_seconds, self.config.label, wait)
        if files:
            self._typical_size = max(1, sum(f.size for f in files) // len(files))
        for claimed in files:
            task = asyncio.create_task(self._work(claimed), name=f"download {claimed.id}")
            self.active[claimed.id] = (claimed, task)
            self.fetching.add(claimed.id)
            task.add_done_callback(functools.partial(self._forget, claimed.id))
        return len(files)

    async def _deletions(self) -> int:
        return await claim_and_carry_out(self.api, self.config, DELETIONS_PER_CLAIM)

    def _fetched(self, file_id: str) -> None:
        """The file's download ended (whatever the outcome): room for the next claim."""
        self.fetching.discard(file_id)
        self._room.set()
        if not self.fetching:  # the last download ended: its completion need not wait for others
            self.reporter.flush()

    def _forget(self, file_id: str, _task: asyncio.Task[None]) -> None:
        self.active.pop(file_id, None)
        self._fetched(file_id)

    def _draw(self) -> None:
        if self.progress.due():  # the list only when a line is drawn (hundreds of small files)
            self.progress.draw([c for c, _ in self.active.values()])
        self.metrics.active.set(len(self.active))

    def _bytes_counter(self, item: Claimed) -> Any:
        """A callback for the transfer threads: counts where it runs (the range workers of one
        file count under one lock), without waking the event loop for every read; the loop
        draws from the counts (self._ticker)."""

        def count(n: int) -> None:
            with self._counting:
                item.bytes_done += n
            self.progress.add_bytes(n)
            self.metrics.bytes.inc(n)

        return count

    async def _ticker(self) -> None:
        """The status line while bytes move (a tick costs nothing when nothing is due)."""
        while True:
            await asyncio.sleep(BAR_INTERVAL)
            self._draw()

    async def _shutdown(self) -> None:
        tasks = [task for _, task in self.active.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.tuning.lane is not None:
            await asyncio.to_thread(self.tuning.lane.close)
        await self.reporter.close()  # completions already queued still go out

    # -- one file --------------------------------------------------------------------------
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
                discard(self.config.storages, item)
                log.warning("%s: lease lost (task cancelled or lease expired); partial file discarded", where(item))
                self.metrics.files.labels("lease_lost").inc()
                return
            # Shutting down: back to the queue at once, with what is on disk as its resume point.
            await self.api.report(item, "release", await self._checkpoint_body(item))
            self.metrics.files.labels("released").inc()
            raise
        except Busy as exc:  # an expired holder in another process still writes it: not ours yet
            log.warning("%s: %s; given back", where(item), exc)
            await self.api.report(item, "release", {})
            return
        except (UnsafePath, NoCommit, WrongSize) as exc:  # not the declared file, or nowhere for it: final
            await self._fail(item, str(exc), retryable=False)
            return
        except NotPublished as exc:
            await self._fail(item, str(exc), retryable=exc.retryable)
            return
        except Unreachable as exc:
            # Not a root this executor serves: back to the queue as a failed attempt, so another
            # executor serving it may take it, and the task fails with this message once the
            # attempts are spent (a release would come straight back to this executor).
            await self._fail(item, f"executor {self.config.label}: {exc}", retryable=True)
            return
        except Upstream as exc:
            retryable = exc.status >= 500 or exc.status == 429
            await self._fail(item, str(exc), retryable=retryable, retry_after=exc.retry_after)
            return
        except (httpx.HTTPError, OSError) as exc:
            await self._fail(item, f"{type(exc).__name__}: {exc}", retryable=True)
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
        if outcome not in ("completed", "already_completed"):
            log.warning("%s: complete refused: %s", where(item), outcome)
        if outcome in ("completed", "already_completed"):
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
            result.tmp.unlink(missing_ok=True)
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
        """The partial download's checkpoint (synced prefix and its sha256), when one runs."""
        transfer = item.transfer
        if transfer is None:
            return {}
        try:
            done, sha256 = await asyncio.to_thread(transfer.checkpoint)
        except OSError:
            return {}
        return {"checkpoint_bytes": done, "checkpoint_sha256": sha256}

    def _beat_interval(self, item: Claimed) -> float:
        # Within a third of the lease, and often enough that progress (and the resume point)
        # is current: `GET /tasks/{id}` shows bytes done while the file downloads.
        return max(min(item.lease_seconds / 3, self.config.progress_seconds), 0.2)

    async def _heartbeats(self, item: Claimed, work: asyncio.Task[Any], lost: asyncio.Event) -> None:
        """Started one interval after the claim: a heartbeat, then one every interval. On a lost
        lease, `work` (the file's task, still downloading) is cancelled."""
        while True:
            try:
                body = {"bytes_done": item.bytes_done, **await self._checkpoint_body(item)}
                await self.reporter.heartbeat(item, body)
            except LeaseLost:
                lost.set()
                work.cancel()
                return
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("%s: heartbeat failed (%s); retrying", where(item), exc)
            await asyncio.sleep(self._beat_interval(item))

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


def run_command(args: argparse.Namespace) -> int:
    """`dlw executor run`: exit 2 on a configuration problem, else run until stopped."""
    config = config_from(args)
    if isinstance(config, list):
        for line in config:
            print(f"dlw executor: {line}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll is noise
    executor = ReferenceExecutor(config)
    if config.metrics_port is not None:
        try:
            executor.metrics.serve(config.metrics_host, config.metrics_port)
        except OSError as exc:
            print(f"dlw executor: --metrics-port {config.metrics_port}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
    route_logs_around(executor.progress)
    return asyncio.run(executor.run())
