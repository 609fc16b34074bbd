"""The snapshot runner without pg_cron: API instances elect a leader through a PostgreSQL advisory
lock; only the leader refreshes; a killed leader is replaced within 15 s; a leader that loses its
connection stops leading at once. With a pg_cron job recorded, the API runs no loop at all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.api.snapshot_leader import LEADER_LOCK_KEY, SnapshotRunner
from tests.support import server
from tests.support.app import app_settings
from tests.support.database import MigratedDb, free_port
from tests.support.deployment import LEADER_HOLDERS as HOLDER
from tests.support.deployment import add_usage, folded, leader_pid, wait_for


@pytest.fixture(scope="module")
def tenant(db: MigratedDb) -> int:
    with db.owner() as conn:
        return int(conn.execute("SELECT dlw.provision_tenant('leader', 'Leader', 0, 0, 0)").fetchone()[0])


@pytest.fixture
def two_servers(db: MigratedDb) -> Iterator[dict[int, subprocess.Popen[str]]]:
    env = server.serve_env(db, DLW_SNAPSHOT_INTERVAL_SECONDS="1")  # default leader retry: 5 s
    ports = [free_port(), free_port()]
    procs = [server.start(env, port) for port in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            server.wait_ready(proc, port)
        yield {proc.pid: proc for proc in procs}
    finally:
        for proc in procs:
            server.stop(proc)


def test_one_of_two_instances_leads_and_a_killed_leader_is_replaced_within_15_s(db, tenant, two_servers):
    wait_for(lambda: leader_pid(db) in two_servers, 15)
    first = leader_pid(db)
    assert first is not None
    xid = add_usage(db, tenant, 11)
    wait_for(lambda: folded(db, xid), 5)  # the leader refreshes every second

    two_servers[first].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    two_servers[first].wait(10)
    xid = add_usage(db, tenant, 22)
    wait_for(lambda: leader_pid(db) not in (None, first), 15)
    wait_for(lambda: folded(db, xid), 15 - (time.monotonic() - killed_at))
    handover = time.monotonic() - killed_at
    print(f"leader handover after SIGKILL: {handover:.1f} s")
    assert handover < 15, handover
    (survivor,) = set(two_servers) - {first}
    assert leader_pid(db) == survivor
    with db.owner() as conn:
        assert (
            conn.execute(
                "SELECT amount FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = dlw.month_start(now())",
                (tenant,),
            ).fetchone()[0]
            == 33
        )
        assert conn.execute("SELECT count(*) FROM dlw.quota_drift()").fetchone()[0] == 0


def test_a_frozen_leader_loses_the_lead_within_its_idle_limit(db, tenant, two_servers):
    """SIGSTOP keeps the leader's socket open, so neither its death nor keepalives end its session:
    the idle limit its session set when it took the lock does (3 s here: 3 x its 1 s probe), and
    the other instance takes over at its next try (every 5 s)."""
    wait_for(lambda: leader_pid(db) in two_servers, 15)
    first = leader_pid(db)
    assert first is not None
    (survivor,) = set(two_servers) - {first}
    two_servers[first].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        xid = add_usage(db, tenant, 7)
        wait_for(lambda: leader_pid(db) == survivor, 20)
        wait_for(lambda: folded(db, xid), 5)
        handover = time.monotonic() - stopped_at
        print(f"leader handover after SIGSTOP: {handover:.1f} s (idle limit 3 s + retry 5 s)")
        assert handover < 3 + 5 + 4, handover
    finally:
        two_servers[first].send_signal(signal.SIGCONT)
    # Resumed, the old leader finds its session gone and competes again; the survivor keeps the lead.
    time.sleep(3)
    assert two_servers[first].poll() is None
    assert leader_pid(db) == survivor


def test_a_leader_that_loses_its_connection_stops_leading(db):
    async def scenario() -> None:
        runner = SnapshotRunner(db.app_url, interval=0.3, retry=1.0)
        runner.mode = "leader"
        task = asyncio.create_task(runner._compete())
        watcher = await asyncpg.connect(db.owner_url)
        try:
            for _ in range(100):
                if runner.is_leader and runner.refreshes >= 2:
                    break
                await asyncio.sleep(0.1)
            assert runner.is_leader

            # Its session dies; someone else takes the lock at once (the runner waits `retry`
            # before it even reconnects).
            killed = await watcher.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                f"dlw-snapshot-runner:{os.getpid()}",
            )
            assert killed
            await asyncio.wait_for(watcher.execute("SELECT pg_advisory_lock($1)", LEADER_LOCK_KEY), 5)
            for _ in range(50):
                if not runner.is_leader:
                    break
                await asyncio.sleep(0.05)
            assert not runner.is_leader
            # It does not refresh without the lock, on any connection.
            refreshes = runner.refreshes
            refreshed_at = await watcher.fetchval("SELECT refreshed_at FROM dlw.snapshot_state")
            await asyncio.sleep(2)
            assert runner.refreshes == refreshes and not runner.is_leader
            assert await watcher.fetchval("SELECT refreshed_at FROM dlw.snapshot_state") == refreshed_at

            # Once the lock is free again it competes, wins and refreshes again.
            await watcher.execute("SELECT pg_advisory_unlock($1)", LEADER_LOCK_KEY)
            for _ in range(50):
                if runner.is_leader and runner.refreshes > refreshes:
                    break
                await asyncio.sleep(0.1)
            assert runner.is_leader and runner.refreshes > refreshes
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await watcher.close()

    asyncio.run(scenario())


def test_under_pg_cron_the_api_runs_no_loop(db):
    with db.owner() as conn:
        conn.execute("UPDATE dlw.snapshot_state SET runner = 'pg_cron', runner_detail = 'test'")
    try:
        with TestClient(create_app(app_settings(db))) as client:
            runner = client.app.state.snapshot_runner  # type: ignore[attr-defined]
            assert runner.mode == "pg_cron" and runner._task is None
            with db.owner() as conn:
                names = [r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity")]
            assert not [n for n in names if n.startswith("dlw-snapshot-runner")]
    finally:
        with db.owner() as conn:
            conn.execute("UPDATE dlw.snapshot_state SET runner = 'leader', runner_detail = NULL")


def test_an_instance_that_stops_gives_up_the_lead_at_once(db):
    with TestClient(create_app(app_settings(db, snapshot_interval_seconds=60))) as client:
        runner = client.app.state.snapshot_runner  # type: ignore[attr-defined]
        wait_for(lambda: runner.is_leader, 10)
        assert leader_pid(db) is not None
    with psycopg.connect(db.owner_url) as conn:
        assert conn.execute(HOLDER, {"key": LEADER_LOCK_KEY}).fetchone() is None
