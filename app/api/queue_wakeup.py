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
MIN_CLAIM_GAP_SECONDS each (a claim limited to one tenant: only for a payload naming it, or
naming none)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import asyncpg

from app.db.queries import SQL
from app.domain import CLAIM_WAIT_SECONDS_MAX as WAIT_SECONDS_MAX

__all__ = ["CHANNEL", "MIN_CLAIM_GAP_SECONDS", "WAIT_SECONDS_MAX", "QueueWakeup"]

log = logging.getLogger("dlw")

CHANNEL = "dlw_executor_queue"
MIN_CLAIM_GAP_SECONDS = 0.05  # a waiting claim claims again at most this often, however often woken
HISTORY = 4096  # wake-ups remembered, to tell a waiting claim whether one concerned its tenant


class QueueWakeup:
    """This instance's waiting claims and the pokes that wake them. A wake-up names the tenant
    whose files became claimable (the NOTIFY payload): a claim limited to another tenant goes on
    waiting; a system-wide claim, or a payload that names no tenant, looks again."""

    def __init__(self) -> None:
        self.generation = 0  # counts wake-ups: a claim waits only if none for it came since it looked
        self._history: deque[tuple[int, int | None]] = deque(maxlen=HISTORY)  # (generation, tenant)
        self._changed = asyncio.Event()
        self._sending: asyncio.Task[None] | None = None
        self._unsent: set[str] = set()  # payloads to NOTIFY: tenant ids, '' for any tenant

    def notified(self, payload: object = None) -> None:
        """A wake-up: the LISTEN callback's payload (a tenant id, or anything else: every claim)."""
        text = str(payload).strip() if payload is not None else ""
        tenant = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None  # '²' is a digit too
        self.generation += 1
        self._history.append((self.generation, tenant))
        self._changed.set()
        self._changed = asyncio.Event()

    def _for(self, seen: int, scope: int | None) -> bool:
        """Whether a wake-up since generation `seen` concerns a claim limited to `scope`."""
        if self.generation == seen:
            return False
        if scope is None or not self._history or self._history[0][0] > seen + 1:
            return True  # system-wide, or wake-ups older than the history remembers
        for gen, tenant in reversed(self._history):  # the newest first, back to `seen`
            if gen <= seen:
                return False
            if tenant is None or tenant == scope:
                return True
        return False

    async def wait(self, seen: int, seconds: float, scope: int | None = None) -> None:
        """Until a wake-up for `scope` (a tenant, None: every tenant) after generation `seen`,
        or for `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._for(seen, scope):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def poke(self, pool: asyncpg.Pool, tenant_id: int | None) -> None:
        """Files of the tenant (None: of any tenant) became claimable through this instance, its
        transaction committed: wake the waiters here now, and the other instances' through NOTIFY
        (one round of notifications in flight per instance; pokes meanwhile go in the next)."""
        payload = "" if tenant_id is None else str(tenant_id)
        self.notified(payload)
        self._unsent.add(payload)
        if self._sending is None:
            self._sending = asyncio.create_task(self._notify(pool))

    async def _notify(self, pool: asyncpg.Pool) -> None:
        try:
            while self._unsent:
                payloads, self._unsent = sorted(self._unsent), set()
                async with pool.acquire() as conn:
                    await conn.execute(SQL["executor_queue_notify"], payloads)
        except Exception as exc:  # a hint: no failure of it may reach anyone
            # Only other instances' waiting claims miss it: they look again when their wait ends.
            # Any exception: a connection terminated under it can fail the pool's release with
            # asyncpg's InternalClientError, which is none of its connection errors.
            log.warning("queue wake-up not sent to other instances: %s", exc.__class__.__name__)
        finally:
            self._sending = None

    async def close(self) -> None:
        if self._sending is not None:
            with contextlib.suppress(Exception):
                await self._sending
