"""Who calls dlw.refresh_quota_snapshots() every minute.

Where the database preloads pg_cron, `dlw migrate` schedules a cron job and records it in
dlw.snapshot_state.runner; the API then runs nothing. Otherwise every API instance competes for
leadership: each keeps one dedicated session connection (not from the pool:
DLW_DIRECT_DATABASE_URL, never a transaction pooler) and tries the session-level
advisory lock LEADER_LOCK_KEY on it every `retry` seconds. The holder refreshes on that same
connection every `interval` seconds, and probes it in between. So:

- a dead leader's lock disappears with its session (at once when its process dies and the
  socket closes; within ~11 s through TCP keepalives when its host vanishes), and another
  instance takes it at its next try: a handover within 15 s;
- a frozen leader (SIGSTOP, a blocked event loop: the socket stays open and answers keepalives)
  loses its session after `idle_limit` seconds without a statement, because the leader's session
  sets idle_session_timeout when it takes the lock; its probes keep a live leader well under
  that. Handover within idle_limit + retry (20 s with the defaults);
- a leader that loses its connection stops acting as leader at once (the probe or the refresh
  fails): it never refreshes on another connection without holding the lock, and competes again
  only after reconnecting;
- runs never overlap in any case: the refresh itself takes a transaction advisory lock and
  returns at once (ran = false) while another run holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import asyncpg

from app.db.connect import connect_once
from app.db.queries import SQL

log = logging.getLogger("dlw.snapshots")

LEADER_LOCK_KEY = 28266757846557028  # "dlwlead"; the refresh's own lock is "dlwsnap" (sql/50_snapshots.sql)
# The server drops the session of a client that vanished without closing its socket after
# idle 5 s + 3 probes 2 s apart; any role may set these. Set by a statement after connecting, not
# as startup parameters, which a pooler in front would refuse.
KEEPALIVES = ("5", "2", "3")  # tcp_keepalives_idle, _interval, _count
# The leader's session may be idle this many probe intervals (at least IDLE_LIMIT_MIN s) before
# the server drops it and the lock with it.
IDLE_LIMIT_PROBES = 3
IDLE_LIMIT_MIN = 3.0


async def configured_runner(pool: asyncpg.Pool) -> tuple[str, str | None]:
    """(runner, detail) as `dlw migrate` recorded them: "pg_cron" or "leader"."""
    try:
        row = await pool.fetchrow(SQL["snapshot_runner"])
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        return "leader", "schema not migrated yet"  # /readyz says NOT_MIGRATED meanwhile
    if row is None:
        return "leader", "no snapshot_state row"
    return str(row["runner"]), row["runner_detail"]


class SnapshotRunner:
    """The API's side of the snapshot refresh: nothing under pg_cron, else the leader loop."""

    def __init__(self, database_url: str, *, interval: float = 60.0, retry: float = 5.0) -> None:
        self.database_url = database_url
        self.interval = interval
        self.retry = retry
        self.probe = min(5.0, interval, retry)
        self.idle_limit = max(IDLE_LIMIT_PROBES * self.probe, IDLE_LIMIT_MIN)
        self.mode = "stopped"
        self.is_leader = False
        self.refreshes = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, pool: asyncpg.Pool) -> None:
        runner, detail = await configured_runner(pool)
        if runner == "pg_cron":
            self.mode = "pg_cron"
            log.info("usage snapshots are refreshed by pg_cron (%s); this instance runs no refresh loop", detail)
            return
        self.mode = "leader"
        self._task = asyncio.create_task(self._compete(), name="dlw-snapshot-leader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.mode = "stopped"

    async def _compete(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("snapshot runner: %s: %s (competing again in %.0f s)", type(exc).__name__, exc, self.retry)
            except Exception:
                log.exception("snapshot runner failed (competing again in %.0f s)", self.retry)
            await asyncio.sleep(self.retry)

    async def _session(self) -> None:
        conn = await connect_once(
            self.database_url, server_settings={"application_name": f"dlw-snapshot-runner:{os.getpid()}"}
        )
        try:
            await conn.fetchval(SQL["session_keepalives"], *KEEPALIVES, timeout=self.probe + 5)
            while True:
                idle_ms = str(round(self.idle_limit * 1000))
                if await conn.fetchval(SQL["try_leader_lock"], LEADER_LOCK_KEY, idle_ms, timeout=self.probe + 5):
                    break
                await asyncio.sleep(self.retry)  # someone else leads; a dead leader's lock vanishes with it
            self.is_leader = True
            log.info(
                "snapshot runner: this instance (pid %s) is the leader (session idle limit %.0f s)",
                os.getpid(),
                self.idle_limit,
            )
            while True:
                await self._refresh(conn)
                deadline = time.monotonic() + self.interval
                while (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(self.probe, left))
                    # A lost connection ends the leadership here, not at the next refresh.
                    await conn.fetchval(SQL["probe"], timeout=self.probe + 5)
        finally:
            if self.is_leader:
                log.warning("snapshot runner: pid %s is no longer the leader", os.getpid())
            self.is_leader = False
            # Dropping the session releases the lock (no round trip that could hang).
            conn.terminate()

    async def _refresh(self, conn: asyncpg.Connection) -> None:
        started = time.monotonic()
        row = await conn.fetchrow(
            SQL["refresh_quota_snapshots"],
            timeout=max(60.0, self.interval),
        )
        assert row is not None
        self.refreshes += 1
        elapsed = (time.monotonic() - started) * 1000
        if not row["ran"]:
            log.info("snapshot refresh skipped: another run holds the refresh lock")
        elif row["events"]:
            log.info(
                "snapshot refresh: %s events of %s tenants folded in %.1f ms (cursor %s)",
                row["events"],
                row["tenants"],
                elapsed,
                row["folded_below"],
            )
