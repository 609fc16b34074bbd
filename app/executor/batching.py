"""Reports sent together: completions and heartbeats of the files in flight go out in one
request (POST /api/v1/executor/reports, one transaction) per batch, at most IN_FLIGHT requests at
a time, so a stream of small files costs a request per batch, not per file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from app.domain import CLAIM_MAX_FILES
from app.executor.client import REPORT_ATTEMPTS, Claimed, LeaseLost

log = logging.getLogger("dlw.executor")

# One report waiting: (action, file, body, what gets the outcome).
_Entry = tuple[str, Claimed, dict[str, Any], Callable[[str], None]]

# A completion waits at most this long for others to join its request. Nothing else waits for it
# (the next claim does not, the lease lasts far longer), except a task's end, which is not
# delayed: with no download running, reports go out at once.
LINGER_SECONDS = 0.05
LINGER_UNTIL = CLAIM_MAX_FILES  # a full request waiting: send at once
# Requests in flight at once: while one is answered the next batch goes out, so completions
# arriving faster than one request a round trip do not pile up behind it (a task's last
# completions would wait for that backlog). Two batches of one task are serialised by the
# database on the task's lock (tasks, then files, in key order: no deadlock).
IN_FLIGHT = 2


class Reporter:
    def __init__(self, http: httpx.AsyncClient, more_coming: Callable[[], bool] = lambda: True) -> None:
        self.http = http
        self.more_coming = more_coming  # whether other reports may join soon (downloads running)
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()  # the linger ends early: nothing more is coming, or a full batch
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._sending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reports")

    async def close(self) -> None:
        if self._task is not None:
            while self._pending or self._sending:  # what is queued still goes out
                self._wake.set()
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def complete(self, item: Claimed, size: int, sha256: str, stored_path: str | None = None) -> str:
        """The completion's outcome (completed, already_completed, or the error code), or
        UNREPORTED when the API could not be reached. stored_path: where the file now lies,
        relative to its target's base directory (a source for later copies of its content)."""
        body: dict[str, Any] = {"bytes": size, "sha256": sha256}
        if stored_path is not None:
            body["stored_path"] = stored_path
        return await self._submit("complete", item, body)

    def complete_soon(
        self, item: Claimed, size: int, sha256: str, stored_path: str | None, then: Callable[[str], None]
    ) -> None:
        """complete() without a future to wait on: `then` gets the outcome, in the event loop,
        when the batch it joined is answered (a stream of small files: no task per file)."""
        body: dict[str, Any] = {"bytes": size, "sha256": sha256}
        if stored_path is not None:
            body["stored_path"] = stored_path
        self._queue(("complete", item, body, then))

    async def heartbeat(self, item: Claimed, body: dict[str, Any]) -> None:
        """Raises LeaseLost when the lease is gone, ValueError for another refusal and
        httpx.HTTPError when the API could not be reached."""
        outcome = await self._submit("heartbeat", item, body)
        if outcome in ("LEASE_LOST", "FILE_NOT_FOUND"):
            raise LeaseLost(item.id)
        if outcome == "UNREPORTED":
            raise httpx.TransportError("heartbeat not delivered")
        if outcome != "ok":
            raise ValueError(f"heartbeat answered {outcome}")

    def flush(self) -> None:
        """Send what is waiting now: the caller knows no more reports are coming soon."""
        self._flush.set()

    async def _submit(self, action: str, item: Claimed, body: dict[str, Any]) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue((action, item, body, functools.partial(_answer, future)))
        return await future

    def _queue(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._wake.set()
        if len(self._pending) >= LINGER_UNTIL:
            self._flush.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let a few more reports join (small files finish a few per millisecond): a request
            # per batch, not per file. Reports wait at most LINGER_SECONDS for it, and no longer
            # once nothing else is downloading (the last files of a task: its end is not delayed).
            self._flush.clear()
            if len(self._pending) < LINGER_UNTIL and self.more_coming():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), LINGER_SECONDS)
            while self._pending:
                await self._slots.acquire()  # the batch is cut once a request may go: all that joined meanwhile
                batch, self._pending = self._pending[:CLAIM_MAX_FILES], self._pending[CLAIM_MAX_FILES:]
                task = asyncio.create_task(self._send_then_release(batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send_then_release(self, batch: list[_Entry]) -> None:
        answers: dict[tuple[str, str], str] = {}
        try:
            answers = await self._send(batch)
        except Exception:  # an answer we cannot read: nobody may wait forever for it
            log.exception("reports not delivered")
        finally:
            self._slots.release()
            for action, item, _, then in batch:  # UNREPORTED when not answered (or cancelled)
                try:
                    then(answers.get((action, item.id), "UNREPORTED"))
                except Exception:  # one waiter's bug must not keep the others from their answers
                    log.exception("%s of %s: handling its answer failed", action, item.id)

    async def _send(self, batch: list[_Entry]) -> dict[tuple[str, str], str]:
        """The answers by (action, file id); a report without one was not delivered."""
        payload: dict[str, list[dict[str, Any]]] = {"completions": [], "heartbeats": []}
        for action, item, body, _ in batch:
            entry = {"file_id": item.id, "assignment_token": item.token, **body}
            payload["completions" if action == "complete" else "heartbeats"].append(entry)
        answers: dict[tuple[str, str], str] = {}
        # Through an outage (a failover answers 503 for seconds) keep trying for half the shortest
        # lease, as single reports do: a completion given up on costs a download again.
        keep_trying_until = time.monotonic() + min(item.lease_seconds for _, item, _, _ in batch) / 2
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.post("/api/v1/executor/reports", json=payload)
            except httpx.HTTPError as exc:
                log.warning("reports not delivered (%s); attempt %d", exc, attempt)
            else:
                if response.status_code == 200:
                    for result in response.json()["results"]:
                        answers[(result["action"], result["file_id"])] = str(result["outcome"])
                    break
                log.warning("reports answered %d: %s", response.status_code, response.text[:200])
                if response.status_code != 503:
                    break
            if attempt >= REPORT_ATTEMPTS and time.monotonic() >= keep_trying_until:
                break
            await asyncio.sleep(min(0.5 * attempt, 2.0))
        return answers


def _answer(future: asyncio.Future[str], outcome: str) -> None:
    if not future.done():  # its waiter may have given up (cancelled)
        future.set_result(outcome)
