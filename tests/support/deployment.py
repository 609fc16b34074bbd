"""Checks that run against whole deployments (one server, servers behind PgBouncer, several
replicas): the admission burst, grant propagation and the snapshot leader. One core each, shared
by tests/api, tests/e2e/test_pgbouncer.py and tests/e2e/test_api_replicas.py."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from app.api.snapshot_leader import LEADER_LOCK_KEY
from tests.support.app import bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

# -- a client that retries like real HTTP clients ---------------------------------------------

# The server closes a keep-alive connection DLW_HTTP_KEEP_ALIVE_SECONDS (5 s) after it sent the
# last answer on it. A client slow to read that answer (its event loop busy for seconds opening
# 100 connections on a loaded machine) then hands the connection to its next request just as the
# server closes it: no answer, "Server disconnected" or a reset. RFC 9112, 9.3.1, lets a client
# send an idempotent request again then; browsers and Go's net/http do, httpx does not.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
UNANSWERED = "Server disconnected without sending a response"


class RetryingTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, plus retries of an idempotent request whose connection closed (or was
    reset) before it was answered; `retried` counts them by error, for the test to print. Each
    such attempt discards the pooled connection it met (a stall can leave several stale at
    once), so the attempts end at the latest on a new connection, which a live server answers;
    a server that drops every request still fails, after one attempt per pooled connection."""

    def __init__(self, *, limits: httpx.Limits = httpx.Limits(max_connections=100), **options: Any) -> None:
        super().__init__(limits=limits, **options)
        self.attempts = (limits.max_connections or 100) + 1
        self.retried: Counter[str] = Counter()  # what a failed attempt met -> how often

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 1
        while True:
            try:
                return await super().handle_async_request(request)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                other_protocol_error = isinstance(exc, httpx.RemoteProtocolError) and UNANSWERED not in str(exc)
                if request.method not in IDEMPOTENT or other_protocol_error or attempt == self.attempts:
                    raise
                self.retried[f"{type(exc).__name__}: {exc}".rstrip(": ")] += 1
                attempt += 1


# -- task creation ------------------------------------------------------------------------------


def task_body(**overrides: Any) -> dict[str, Any]:
    return {"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 10}], **overrides}


async def fire(bases: Sequence[str], headers: dict[str, str], bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body to /api/v1/tasks at once, spread round-robin over the servers `bases`."""
    clients = [httpx.AsyncClient(base_url=b, timeout=60, limits=httpx.Limits(max_connections=200)) for b in bases]
    try:
        targets = itertools.cycle(clients)
        return await asyncio.gather(*(next(targets).post("/api/v1/tasks", headers=headers, json=b) for b in bodies))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def admission_burst(db: MigratedDb, bases: Sequence[str], label: str) -> dict[str, int]:
    """Three tenants (concurrency limits 10, 3, 7) hit by 200, 60 and 60 simultaneous creates,
    spread over `bases`: exactly the limit is admitted (201), every other create is 429 and
    audited, and the database holds exactly `limit` tasks per tenant. Returns the figures."""
    limits, counts = (10, 3, 7), (200, 60, 60)
    tids = [tenant(db, f"{label}-rush-{i}", concurrent=limit) for i, limit in enumerate(limits)]

    async def all_at_once() -> list[list[httpx.Response]]:
        return await asyncio.gather(
            *(
                fire(bases, bearer(token(tid, "tenant_operator")), [task_body(revision=f"r{i}") for i in range(n)])
                for tid, n in zip(tids, counts, strict=True)
            )
        )

    results = asyncio.run(all_at_once())
    figures = {"sent": sum(counts), "admitted": 0, "refused": 0, "over_admitted": 0, "other": 0}
    with db.owner() as conn:
        for tid, responses, limit, n in zip(tids, results, limits, counts, strict=True):
            codes = [r.status_code for r in responses]
            stored = conn.execute("SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)).fetchone()
            assert stored is not None
            figures["admitted"] += codes.count(201)
            figures["refused"] += codes.count(429)
            figures["over_admitted"] += max(0, int(stored[0]) - limit)
            figures["other"] += n - codes.count(201) - codes.count(429)
            bad = [r.text for r in responses if r.status_code not in (201, 429)][:3]
            assert codes.count(201) == limit and codes.count(429) == n - limit, (sorted(set(codes)), bad)
            assert stored == (limit,)
            assert conn.execute(
                "SELECT sum(count) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'quota.exceeded'", (tid,)
            ).fetchone() == (n - limit,)
    return figures


# -- grants ---------------------------------------------------------------------------------------


def time_until(url: str, headers: dict[str, str], status: int, limit: float = 5.0) -> float:
    """Seconds until GET url answers `status` (polled every 20 ms)."""
    return times_until([url], headers, status, since=time.monotonic(), limit=limit)[0]


def times_until(
    urls: Sequence[str], headers: dict[str, str], status: int, since: float, limit: float = 5.0
) -> list[float]:
    """Seconds from `since` until each GET url first answers `status`. Each url is polled by its
    own task on a kept-alive connection every 20 ms, so no server's figure includes the time
    spent polling another."""

    async def poll(http: httpx.AsyncClient, url: str) -> float:
        while time.monotonic() - since < limit:
            if (await http.get(url, headers=headers)).status_code == status:
                return time.monotonic() - since
            await asyncio.sleep(0.02)
        raise AssertionError(f"{url} never answered {status} within {limit} s")

    async def all_urls() -> list[float]:
        async with httpx.AsyncClient(timeout=2, transport=RetryingTransport()) as http:
            return list(await asyncio.gather(*(poll(http, url) for url in urls)))

    return asyncio.run(all_urls())


def grant_round_trip(db: MigratedDb, bases: Sequence[str], user: str) -> tuple[list[float], list[float]]:
    """A DBA grants tenant_admin to a viewer in SQL, then revokes it: the seconds from each
    commit until each server answers the viewer's GET /api/v1/users with 200, then with 403."""
    viewer = bearer(token(1, "tenant_viewer", user_id=user))
    urls = [f"{base}/api/v1/users" for base in bases]
    assert all(httpx.get(url, headers=viewer).status_code == 403 for url in urls)
    with db.owner() as conn:
        conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', %s, 'tenant_admin')", (f"user:{user}",))
    granted = times_until(urls, viewer, 200, since=time.monotonic())
    with db.owner() as conn:
        conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 = %s", (f"user:{user}",))
    revoked = times_until(urls, viewer, 403, since=time.monotonic())
    return granted, revoked


# -- the snapshot leader ------------------------------------------------------------------------

LEADER_HOLDERS = """
    SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = (%(key)s >> 32)::oid AND l.objid = (%(key)s & 4294967295)::oid AND l.objsubid = 1"""


def leader_pids(db: MigratedDb) -> list[int]:
    """The OS pids of the API processes holding the leader lock (from their application_name)."""
    with db.owner() as conn:
        rows = conn.execute(LEADER_HOLDERS, {"key": LEADER_LOCK_KEY}).fetchall()
    return [int(r[0].rsplit(":", 1)[1]) for r in rows]


def leader_pid(db: MigratedDb) -> int | None:
    pids = leader_pids(db)
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


def add_usage(db: MigratedDb, tenant_id: int, amount: int) -> int:
    """A committed usage event; returns its transaction id."""
    with db.owner() as conn:
        row = conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
            " VALUES (%s, 'bytes_month', %s, %s) RETURNING xid::text",
            (tenant_id, amount, f"test:{uuid.uuid4()}"),
        ).fetchone()
    assert row is not None
    return int(row[0])


def folded(db: MigratedDb, xid: int) -> bool:
    """The snapshots include the usage event of transaction `xid`."""
    with db.owner() as conn:
        row = conn.execute("SELECT folded_below::text::bigint > %s FROM dlw.snapshot_state", (xid,)).fetchone()
    return bool(row and row[0])


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.1) -> float:
    """Seconds until predicate() is true; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")
