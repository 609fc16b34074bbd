"""The run loop of the reference executor (behaviour in app/executor/__init__.py): claim while
slots are free, one task per file (app/executor/file_work.py), deletions beside the claims, and a
clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import httpx

from app.domain import CLAIM_MAX_FILES, CLAIM_WAIT_SECONDS_MAX
from app.executor.batching import Reporter
from app.executor.client import Claimed, ExecutorApi, TokenRefused
from app.executor.curl_lane import CurlLane
from app.executor.deletion_work import claim_and_carry_out
from app.executor.download import Tuning, lane_takes
from app.executor.metrics import ExecutorMetrics
from app.executor.progress import BAR_INTERVAL, Mode, Progress, route_logs_around
from app.executor.settings import Config, config_from
from app.executor.small_files import BatchWork

log = logging.getLogger("dlw.executor")

USER_AGENT = "dlw-reference-executor"
DELETIONS_PER_CLAIM = 4  # each takes a moment (unlinks): a few per turn of the loop
DELETIONS_BUSY_SECONDS = 1.0  # asked for at most this often while files download (a request each)
QUEUE_MAX = 2 * CLAIM_MAX_FILES  # files held waiting or downloading, at most (small files)


class ReferenceExecutor(BatchWork):
    def __init__(self, config: Config, *, progress: Mode | None = None) -> None:
        self.config = config
        self.progress = Progress(progress or ("bar" if sys.stderr.isatty() else "lines"))
        self.metrics = ExecutorMetrics()
        self.stopping = asyncio.Event()
        self.active: dict[str, tuple[Claimed, asyncio.Task[None]]] = {}  # held: downloading, waiting, reporting
        self.fetching: set[str] = set()  # of those, the files not downloaded yet
        self._room = asyncio.Event()  # a download ended
        self._typical_size = 0  # mean declared size of the last claim's files
        self._claim_answered = False  # the last claim got the API's answer (it may have waited there)
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
            deletions = asyncio.create_task(self._deletion_loop())
            try:
                await self._loop()
            finally:
                self.stop()  # the deletion loop ends after the deletion it carries out, if any
                await asyncio.gather(deletions, return_exceptions=True)
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
                    self._claim_answered = False
                    got = await self._claimed("claim", functools.partial(self._claim, free, wait))
                    if got is None:
                        break
                    # Waited only if the API answered: an unreachable API is asked again after the
                    # poll interval, not at once.
                    claimed, waited = got, wait > 0 and self._claim_answered
                    if claimed < asked:
                        next_claim = time.monotonic() + self.config.poll_seconds
                # Claim again at once while the queue gave all it was asked for and there is room;
                # else wait for a download to finish, a stop, or the poll interval (a claim that
                # waited on the server has waited already).
                more = claimed == asked > 0 and len(self.fetching) < self._queue_target()
                if not more and not (waited and not claimed):
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
        self._claim_answered = True
        if files:
            self._typical_size = max(1, sum(f.size for f in files) // len(files))
        small: list[Claimed] = []
        others: list[Claimed] = []
        for claimed in files:
            (small if lane_takes(self.tuning, claimed) else others).append(claimed)
        if small:  # one task for all of them (app/executor/small_files.py)
            batch = asyncio.create_task(self._work_batch(small), name=f"{len(small)} small files")
            for claimed in small:
                self.active[claimed.id] = (claimed, batch)
                self.fetching.add(claimed.id)
            batch.add_done_callback(functools.partial(self._forget_all, [claimed.id for claimed in small]))
        for claimed in others:
            task = asyncio.create_task(self._work(claimed), name=f"download {claimed.id}")
            self.active[claimed.id] = (claimed, task)
            self.fetching.add(claimed.id)
            task.add_done_callback(functools.partial(self._forget, claimed.id))
        return len(files)

    async def _deletion_loop(self) -> None:
        """Deletions of tasks' files (docs/storage.md, "Deleting"), beside the file claims and never
        in their way: asked for again at once while there were some, else after the poll interval,
        or a second while files download (each ask is a request and a transaction)."""
        while not self.stopping.is_set():
            got = await self._claimed("deletion claim", self._deletions)
            if got is None:
                return
            if not got:
                pause = max(self.config.poll_seconds, DELETIONS_BUSY_SECONDS if self.fetching else 0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), pause)

    async def _deletions(self) -> int:
        return await claim_and_carry_out(self.api, self.config, DELETIONS_PER_CLAIM)

    def _forget(self, file_id: str, _task: asyncio.Task[None]) -> None:
        self.active.pop(file_id, None)
        self._fetched(file_id)

    def _forget_all(self, file_ids: list[str], _task: asyncio.Task[None]) -> None:
        """A batch ended (its files were forgotten one by one; this is for one it could not)."""
        for file_id in file_ids:
            if file_id in self.active and self.active[file_id][1] is _task:
                self._forget(file_id, _task)

    def _draw(self) -> None:
        if self.progress.due():  # the list only when a line is drawn (hundreds of small files)
            self.progress.draw([c for c, _ in self.active.values()])
        self.metrics.active.set(len(self.active))

    async def _ticker(self) -> None:
        """The status line while bytes move (a tick costs nothing when nothing is due)."""
        while True:
            await asyncio.sleep(BAR_INTERVAL)
            self._draw()

    async def _shutdown(self) -> None:
        tasks = list({task for _, task in self.active.values()})  # a batch holds many files
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.tuning.lane is not None:
            await asyncio.to_thread(self.tuning.lane.close)
        await self.reporter.close()  # completions already queued still go out


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
