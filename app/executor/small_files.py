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

from app.executor.client import Claimed
from app.executor.download import Downloaded, lane_transfer, with_hub_token
from app.executor.file_work import FileWork
from app.executor.http_ranges import Cancelled
from app.executor.lane_transfer import LaneTransfer
from app.executor.progress import where

log = logging.getLogger("dlw.executor")


class BatchWork(FileWork):
    """The batch half of ReferenceExecutor's per-file work (runner.py hands it the lane's files)."""

    active: dict[str, tuple[Claimed, asyncio.Task[None]]]

    async def _work_batch(self, items: list[Claimed]) -> None:
        lane = self.tuning.lane
        assert lane is not None
        downloading: dict[str, tuple[Claimed, LaneTransfer[Downloaded]]] = {}
        lost: set[str] = set()
        reports: set[asyncio.Task[Any]] = set()  # failures and releases being reported, downloads elsewhere
        elsewhere: set[asyncio.Task[Any]] = set()  # downloads of files the lane could not take (FileWork._work)
        left = len(items)
        all_done = asyncio.Event()
        lane_done = asyncio.Event()  # the lane has handed over every file it took

        def ours(item: Claimed) -> bool:  # the executor's entry is still this claim of the file
            held = self.active.get(item.id)
            return held is not None and held[0] is item

        def finished(item: Claimed) -> None:  # the file's life in this executor is over
            nonlocal left
            if ours(item):
                self.active.pop(item.id, None)
            left -= 1
            if left == 0:
                all_done.set()

        def then_finished(item: Claimed, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            def done(task: asyncio.Task[Any]) -> None:
                reports.discard(task)
                finished(item)

            task = asyncio.create_task(work)
            reports.add(task)
            task.add_done_callback(done)
            return task

        def answered(item: Claimed, result: Downloaded, outcome: str) -> None:
            try:
                self._completed(item, result, outcome)
            finally:
                finished(item)

        def ended(item: Claimed, future: asyncio.Future[Downloaded]) -> None:
            downloading.pop(item.id, None)
            if not downloading:
                lane_done.set()
            if ours(item):
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
                else:
                    then_finished(item, self._report_failure(item, problem))
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
                elsewhere.add(then_finished(item, self._work(item)))
                continue
            downloading[item.id] = (item, transfer)
            future.add_done_callback(functools.partial(ended, item))
        if not downloading:
            lane_done.set()
        beats = asyncio.create_task(self._batch_heartbeats(items, downloading, lost))
        beats.add_done_callback(_log_failure)
        try:
            await all_done.wait()
        except asyncio.CancelledError:
            # Stopping: the lane stops what it holds of the batch, each file's end is handled as
            # it comes (a release), and the reports (and downloads elsewhere) are waited for,
            # including any started meanwhile. Waited on, never gathered: the lane's own
            # futures are not cancelled with this task.
            for _, transfer in list(downloading.values()):
                lane.cancel(transfer)
            await lane_done.wait()
            for task in elsewhere:
                task.cancel()  # a download: it releases its file itself
            while reports:
                await asyncio.wait(set(reports))
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
            held = await asyncio.gather(*(self._beat(item) for item, _ in alive))
            for (item, transfer), still in zip(alive, held, strict=True):
                if not still:
                    lost.add(item.id)
                    lane.cancel(transfer)

    async def _report_failure(self, item: Claimed, problem: BaseException) -> None:
        if not isinstance(problem, Exception) or not await self._after_failure(item, problem):
            log.error("%s: download failed", where(item), exc_info=problem)


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A batch's heartbeats stopped on something unexpected: said, not lost with the task."""
    if not task.cancelled() and task.exception() is not None:
        log.error("small-file heartbeats stopped", exc_info=task.exception())
