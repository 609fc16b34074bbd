"""Long-poll claims: `POST /api/v1/executor/claim` with `wait_seconds` waits, when nothing is
claimable, until files may have become so, instead of the executor asking again every poll
interval (docs/executors.md, "Waiting for work").

A wake-up is only a hint: the waiting claim runs the ordinary claim again, which decides. Files
become claimable through a task created or retried, or a file released or failed retryably:
the route that did it pokes this instance's waiters at once, and every other instance through
NOTIFY dlw_executor_queue, sent in a transaction of its own after the work committed (never in
the creating transaction: a NOTIFY serialises the commits of the transactions that send one).
Each instance LISTENs on the authorizer's listening connection. What no route sees — an expired
lease, a backoff that ran out — is found by the claim the wait ends with. Anyone who can connect
may NOTIFY the channel; that only makes waiting claims look again, at most every
MIN_CLAIM_GAP_SECONDS each."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from app.db.queries import SQL
from app.domain import CLAIM_WAIT_SECONDS_MAX as WAIT_SECONDS_MAX

__all__ = ["CHANNEL", "MIN_CLAIM_GAP_SECONDS", "WAIT_SECONDS_MAX", "QueueWakeup"]

log = logging.getLogger("dlw")

CHANNEL = "dlw_executor_queue"
MIN_CLAIM_GAP_SECONDS = 0.02  # a waiting claim claims again at most this often, however often woken


class QueueWakeup:
    """This instance's waiting claims and the pokes that wake them."""

    def __init__(self) -> None:
        self.generation = 0  # counts wake-ups: a claim waits only if none came since it looked
        self._changed = asyncio.Event()
        self._sending: asyncio.Task[None] | None = None
        self._again = False

    def notified(self, *_args: object) -> None:
        """A wake-up (the LISTEN callback; the payload is ignored)."""
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen: int, seconds: float) -> None:
        """Until a wake-up after generation `seen`, or for `seconds`."""
        if self.generation != seen or seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def poke(self, pool: asyncpg.Pool) -> None:
        """Work became claimable through this instance (its transaction committed): wake the
        waiters here now, and the other instances' through NOTIFY (one notification in flight
        per instance; pokes meanwhile send one more after it)."""
        self.notified()
        if self._sending is not None:
            self._again = True
            return
        self._sending = asyncio.create_task(self._notify(pool))

    async def _notify(self, pool: asyncpg.Pool) -> None:
        try:
            while True:
                self._again = False
                async with pool.acquire() as conn:
                    await conn.execute(SQL["executor_queue_notify"])
                if not self._again:
                    return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Only other instances' waiting claims miss it: they look again when their wait ends.
            log.warning("queue wake-up not sent to other instances: %s", exc.__class__.__name__)
        finally:
            self._sending = None

    async def close(self) -> None:
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending
