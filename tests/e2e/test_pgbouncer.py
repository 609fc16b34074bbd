"""DLW behind a real PgBouncer in transaction mode (issue 12, item 3): DLW_DATABASE_URL points at
the pooler, DLW_DIRECT_DATABASE_URL at PostgreSQL for LISTEN and the snapshot leader. The
pooler keeps 4 server connections for the API's 20, so requests of different tenants share
server connections all the time."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from app.db.connect import behind_pooler
from tests.support import server
from tests.support.app import bearer, token
from tests.support.database import MigratedDb, free_port
from tests.support.deployment import (
    RetryingTransport,
    add_usage,
    admission_burst,
    fire,
    folded,
    grant_round_trip,
    leader_pid,
    task_body,
    wait_for,
)
from tests.support.pgbouncer import Bouncer, running_pgbouncer
from tests.support.tenants import tenant


@pytest.fixture(scope="module")
def bouncer(db: MigratedDb) -> Iterator[Bouncer]:
    with running_pgbouncer(db, pool_size=4) as b:
        yield b


@pytest.fixture(scope="module")
def api(db: MigratedDb, bouncer: Bouncer) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """One `dlw serve` whose requests go through the pooler (DLW_DATABASE_POOLER left at auto)."""
    port = free_port()
    env = server.serve_env(
        db,
        DLW_DATABASE_URL=bouncer.app_url,
        DLW_DIRECT_DATABASE_URL=db.app_url,
        DLW_SNAPSHOT_INTERVAL_SECONDS="1",
        DLW_QUOTA_LOCK_TIMEOUT_MS="30000",
    )
    proc = server.start(env, port)
    try:
        server.wait_ready(proc, port)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        server.stop(proc)
        # The only startup parameter PgBouncer refused is the pooler probe's (app/db/connect.py).
        refused = [line for line in bouncer.log().splitlines() if "unsupported startup parameter" in line]
        assert refused and all("dlw.pooler_probe" in line for line in refused), refused


def test_the_pooler_is_detected_and_serving_without_a_direct_url_is_refused(db: MigratedDb, bouncer: Bouncer):
    assert asyncio.run(behind_pooler(bouncer.app_url)) is True
    assert asyncio.run(behind_pooler(db.app_url)) is False
    for pooler in ("auto", "transaction"):
        proc = server.start(
            server.serve_env(db, DLW_DATABASE_URL=bouncer.app_url, DLW_DATABASE_POOLER=pooler), free_port()
        )
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, err
        assert "set DLW_DIRECT_DATABASE_URL to a session connection" in err, err
    # The session URL runs as dlw_app too: a superuser there is refused like on DLW_DATABASE_URL.
    proc = server.start(
        server.serve_env(db, DLW_DATABASE_URL=bouncer.app_url, DLW_DIRECT_DATABASE_URL=db.owner_url), free_port()
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "DLW_DIRECT_DATABASE_URL: database role" in err and "is a superuser" in err, err


def test_named_statements_break_when_the_pooler_switches_server_connections(db: MigratedDb):
    """The failure DLW avoids, made deterministic on a two-connection pooler: asyncpg's statement
    cache prepares `__asyncpg_stmt_N__` on server connection A; while another client holds A in a
    transaction, the next call runs on B, where that statement does not exist. Without named
    statements (what DLW uses behind a pooler) the same sequence works."""

    async def scenario(url: str, **options: int) -> int:
        client = await asyncpg.connect(url, **options)
        holder = await asyncpg.connect(url, statement_cache_size=0)
        try:
            assert await client.fetchval("SELECT $1::int", 1) == 1  # on A, then A goes back to the pool
            async with holder.transaction():
                await holder.execute("SELECT 1")  # holds A until the end of this transaction
                return int(await client.fetchval("SELECT $1::int", 2))  # runs on B
        finally:
            await client.close()
            await holder.close()

    with running_pgbouncer(db, pool_size=2) as pair:
        with pytest.raises(asyncpg.InvalidSQLStatementNameError, match=r"__asyncpg_stmt_\w+__\" does not exist"):
            asyncio.run(scenario(pair.app_url))
        assert asyncio.run(scenario(pair.app_url, statement_cache_size=0)) == 2


def test_the_tenant_context_never_outlives_its_transaction_on_a_shared_server_connection(db: MigratedDb):
    """dlw.set_context is transaction-local: through a one-connection pooler, the next client
    gets the same server backend with no tenant context and sees no rows. The control: a
    session-level set_config (what a plain SET would do) does leak to the next client."""
    first_tenant, second_tenant = tenant(db, "ctx-first"), tenant(db, "ctx-second")  # each has a project
    visible = "SELECT pg_backend_pid(), current_setting('dlw.tenant_id', true), count(*) FROM dlw.projects"

    async def scenario(url: str) -> None:
        a = await asyncpg.connect(url, statement_cache_size=0)
        b = await asyncpg.connect(url, statement_cache_size=0)
        try:
            async with a.transaction():
                await a.execute("SELECT dlw.set_context($1, 'alice', 'tenant_viewer')", first_tenant)
                a_pid, a_ctx, a_rows = await a.fetchrow(visible)
                assert a_ctx == str(first_tenant) and a_rows >= 1
            b_pid, b_ctx, b_rows = await b.fetchrow(visible)
            assert b_pid == a_pid  # the same server connection
            assert b_ctx in (None, "") and b_rows == 0
            async with b.transaction():
                await b.execute("SELECT dlw.set_context($1, 'bob', 'tenant_viewer')", second_tenant)
                tenants = await b.fetch("SELECT DISTINCT tenant_id FROM dlw.projects")
                assert [r[0] for r in tenants] == [second_tenant]
            # Control: a session-level setting is what would leak through the pooler.
            await a.execute("SELECT set_config('dlw.tenant_id', $1, false)", str(first_tenant))
            leaked_pid, leaked, _ = await b.fetchrow(visible)
            assert leaked_pid == a_pid and leaked == str(first_tenant)
        finally:
            await a.close()
            await b.close()

    with running_pgbouncer(db, pool_size=1) as single:
        asyncio.run(scenario(single.app_url))


def test_200_simultaneous_creates_through_pgbouncer_admit_exactly_the_limit(db: MigratedDb, api):
    base, _ = api
    figures = admission_burst(db, [base], "pgb")
    print(f"200-way admission through PgBouncer (transaction mode, 4 server connections): {figures}")
    assert figures["over_admitted"] == 0 and figures["other"] == 0


def test_concurrent_lists_of_many_tenants_show_each_only_its_own_tasks(db: MigratedDb, api):
    base, _ = api
    tids = [tenant(db, f"pgb-list-{i}", concurrent=0) for i in range(8)]
    own: dict[int, set[str]] = {}
    for tid in tids:
        created = asyncio.run(
            fire([base], bearer(token(tid, "tenant_operator")), [task_body(revision=f"v{i}") for i in range(4)])
        )
        assert [r.status_code for r in created] == [201] * 4
        own[tid] = {r.json()["id"] for r in created}
    askers = [tid for tid in tids for _ in range(40)]
    random.Random(12).shuffle(askers)

    # 320 requests over 100 connections: each connection serves several, so a request may meet
    # one the server has just closed as idle; it is sent again, as a real client would.
    transport = RetryingTransport(limits=httpx.Limits(max_connections=100))

    async def lists() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60, transport=transport) as http:
            return await asyncio.gather(
                *(http.get("/api/v1/tasks", headers=bearer(token(tid, "tenant_viewer"))) for tid in askers)
            )

    started = time.monotonic()
    answers = asyncio.run(lists())
    wrong = [
        (tid, r.status_code)
        for tid, r in zip(askers, answers, strict=True)
        if r.status_code != 200 or {t["id"] for t in r.json()["items"]} != own[tid]
    ]
    print(f"{len(askers)} concurrent lists of {len(tids)} tenants through PgBouncer in "
          f"{time.monotonic() - started:.1f} s: {len(wrong)} wrong; sent again on a connection the server"
          f" closed as idle: {dict(transport.retried) or 0}")  # fmt: skip
    assert wrong == []


def test_a_grant_reaches_the_server_behind_pgbouncer_within_a_second(db: MigratedDb, api):
    base, _ = api
    granted, revoked = grant_round_trip(db, [base], "pgb-promoted")
    print(f"grant behind PgBouncer: visible after {granted[0]:.2f} s, revoke after {revoked[0]:.2f} s")
    assert max(granted) < 1.0 and max(revoked) < 1.0, (granted, revoked)


def test_the_leader_behind_pgbouncer_refreshes_the_snapshots(db: MigratedDb, api):
    _, proc = api
    wait_for(lambda: leader_pid(db) == proc.pid, 15)
    tid = tenant(db, "pgb-usage")
    xid = add_usage(db, tid, 42)
    seconds = wait_for(lambda: folded(db, xid), 5)  # the leader refreshes every second
    print(f"usage folded into the snapshots {seconds:.1f} s after its commit (leader pid {proc.pid})")
    with db.owner() as conn:
        sessions = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            (f"dlw-snapshot-runner:{proc.pid}",),
        ).fetchone()
    assert sessions == (1,)
    assert os.kill(proc.pid, 0) is None  # still serving
