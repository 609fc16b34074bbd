"""The small files of one claim as one batch through the lane (app/executor/curl_lane.py): one
task for the batch, where a task, a timer and three futures per file cost the event loop more
than the file's transfer (bench/README.md). Each file is handled as the lane hands it over: a
verified file's completion joins the next report request (Reporter.complete_soon), a failure is
reported as the per-file path reports it (FileWork._after_failure). The batch's heartbeats keep
the leases of its files still waiting or downloading, and a lost lease stops that file. On a stop
the files still downloading are stopped and given back (released), as the per-file path does."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any

import httpx

from app.executor.client import Claimed, LeaseLost
from app.executor.curl_lane import LaneTransfer
from app.executor.download import Downloaded, lane_transfer, with_hub_token
from app.executor.file_work import FileWork
from app.executor.http_ranges import Cancelled
from app.executor.progress import where

log = logging.getLogger("dlw.executor")


class BatchWork(FileWork):
    """The batch half of ReferenceExecutor's per-file work (runner.py hands it the lane's files)."""

    active: dict[str, tuple[Claimed, asyncio.Task[None]]]

    async def _work_batch(self, items: list[Claimed]) -> None:
        lane = self.tuning.lane
        assert lane is not None
        downloading: dict[str, tuple[Claimed, LaneTransfer[Downloaded]]] = {}
        waits: list[asyncio.Future[Downloaded]] = []
        lost: set[str] = set()
        reports: set[asyncio.Task[Any]] = set()  # failures and releases being reported, downloads elsewhere
        elsewhere: set[str] = set()  # files the lane could not take: downloaded by FileWork._work
        left = [len(items)]
        all_done = asyncio.Event()

        def finished(item: Claimed) -> None:  # the file's life in this executor is over
            self.active.pop(item.id, None)
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

        def then_finished(item: Claimed, work: Coroutine[Any, Any, Any]) -> None:
            def done(task: asyncio.Task[Any]) -> None:
                reports.discard(task)
                finished(item)

            task = asyncio.create_task(work, name=item.id)
            reports.add(task)
            task.add_done_callback(done)

        def answered(item: Claimed, result: Downloaded, outcome: str) -> None:
            self._completed(item, result, outcome)
            finished(item)

        def ended(item: Claimed, future: asyncio.Future[Downloaded]) -> None:
            downloading.pop(item.id, None)
            self._fetched(item.id)
            try:
                problem = Cancelled() if future.cancelled() else future.exception()
                if problem is None:
                    result = future.result()
                    then = functools.partial(answered, item, result)
                    self.reporter.complete_soon(item, result.size, result.sha256, result.place.stored_path, then)
                elif isinstance(problem, Cancelled) and item.id in lost:
                    self._lease_lost(item)
                    finished(item)
                elif isinstance(problem, Cancelled):  # stopping: back to the queue at once
                    then_finished(item, self._release(item))
                elif isinstance(problem, Exception):
                    then_finished(item, self._report_failure(item, problem))
                else:
                    raise problem
            except BaseException:  # a bug here must not leave the batch waiting for this file
                log.exception("%s: its end could not be handled", where(item))
                finished(item)

        for item in items:
            transfer = lane_transfer(
                self.config.storages,
                self.config.hf_endpoint,
                item,
                with_hub_token(self.hub_headers, item),
                self._bytes_counter(item),
                functools.partial(self._verify_and_publish, item),
            )
            try:
                future = lane.submit(transfer)
            except RuntimeError:  # the lane closed or broke meanwhile: the file takes a download slot
                then_finished(item, self._work(item))
                elsewhere.add(item.id)
                continue
            downloading[item.id] = (item, transfer)
            waits.append(future)
            future.add_done_callback(functools.partial(ended, item))
        beats = asyncio.create_task(self._batch_heartbeats(items, downloading, lost))
        try:
            await all_done.wait()
        except asyncio.CancelledError:
            for _, transfer in list(downloading.values()):
                lane.cancel(transfer)
            await asyncio.gather(*waits, return_exceptions=True)  # each one's end is handled first
            for task in reports:
                if task.get_name() in elsewhere:
                    task.cancel()  # a download: it releases its file itself
            await asyncio.gather(*list(reports), return_exceptions=True)
            raise
        finally:
            beats.cancel()

    async def _batch_heartbeats(
        self,
        items: list[Claimed],
        downloading: dict[str, tuple[Claimed, LaneTransfer[Downloaded]]],
        lost: set[str],
    ) -> None:
        """After one interval, and every interval: a heartbeat for each file of the batch still
        waiting or downloading (they go out together, Reporter). A lost lease stops its file."""
        interval = min(self._beat_interval(item) for item in items)
        lane = self.tuning.lane
        assert lane is not None
        while True:
            await asyncio.sleep(interval)
            alive = list(downloading.values())
            if not alive:
                return
            outcomes = await asyncio.gather(
                *(self.reporter.heartbeat(item, {"bytes_done": item.bytes_done}) for item, _ in alive),
                return_exceptions=True,
            )
            for (item, transfer), outcome in zip(alive, outcomes, strict=True):
                if isinstance(outcome, LeaseLost):
                    lost.add(item.id)
                    lane.cancel(transfer)
                elif isinstance(outcome, (httpx.HTTPError, ValueError)):
                    log.warning("%s: heartbeat failed (%s); retrying", where(item), outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome

    async def _release(self, item: Claimed) -> None:
        await self.api.report(item, "release", {})
        self.metrics.files.labels("released").inc()

    async def _report_failure(self, item: Claimed, problem: Exception) -> None:
        if not await self._after_failure(item, problem):
            log.error("%s: download failed", where(item), exc_info=problem)
