"""`dlw migrate` waits for table locks at most `lock_timeout` at a time, retries a bounded number
of times, names what it waits for, and fails with one clear line instead of hanging.

The attack: a reporting login runs `BEGIN; SELECT * FROM reporting.tasks;` and sits idle. A
re-apply of the program (DROP/CREATE POLICY, CREATE OR REPLACE VIEW: exclusive locks) queues
behind that transaction's share lock while holding the locks it already took, and every
tenant's /quota/current queues behind the migrate: without a lock timeout, until the analyst
commits."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from app.db.queries import SQL
from app.ops.lock_waits import MigrateLockTimeout
from app.ops.migrate import migrate
from tests.support.database import MigratedDb
from tests.support.tenants import SeededTenant, seeded_tenants

LOCK_TIMEOUT = 1.0
# Short waits for the tests; the command's defaults are 2 s, 5 attempts, backoff from 1 s.
LOCKS: dict[str, Any] = {"lock_timeout": LOCK_TIMEOUT, "lock_attempts": 3, "lock_backoff": 0.5}


@pytest.fixture(scope="module")
def analyst(db: MigratedDb) -> Iterator[SeededTenant]:
    with seeded_tenants(db, "analyst") as [t]:
        yield t


@pytest.fixture
def idle_reporting_transaction(db: MigratedDb, analyst: SeededTenant) -> Iterator[psycopg.Connection]:
    """A reporting login that ran BEGIN; SELECT * FROM reporting.tasks; and sits idle."""
    conn = psycopg.connect(db.url(analyst.login, analyst.password), application_name="bi-tool")
    try:
        assert conn.execute("SELECT count(*) FROM reporting.tasks").fetchone() == (1,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        yield conn
    finally:
        conn.close()


def quota_latencies(db: MigratedDb, tenant_id: int, running: threading.Event) -> list[float]:
    """/quota/current's SQL as dlw_app, as the API runs it, again and again while `running`."""
    latencies: list[float] = []
    with psycopg.connect(db.app_url, options="-c statement_timeout=20s") as conn:
        while running.is_set():
            started = time.monotonic()
            with conn.transaction():
                conn.execute("SELECT dlw.set_context(%s, 'viewer', 'tenant_viewer')", (tenant_id,))
                assert conn.execute(SQL["quota_current"]).fetchone() is not None
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    return latencies


def migrate_beside_quota_reads(db: MigratedDb, tenant_id: int, **locks: Any) -> tuple[object, list[float], float]:
    """Run a forced re-apply in a thread while /quota/current is read; returns (the migrate's
    result or exception, the reads' latencies, the migrate's duration)."""
    outcome: list[object] = []
    running = threading.Event()
    running.set()

    def run() -> None:
        started = time.monotonic()
        try:
            outcome.append(migrate(db.owner_url, force_program=True, **locks))
        except Exception as exc:
            outcome.append(exc)
        finally:
            outcome.append(time.monotonic() - started)
            running.clear()

    thread = threading.Thread(target=run)
    latencies: list[float] = []
    reader = threading.Thread(target=lambda: latencies.extend(quota_latencies(db, tenant_id, running)))
    thread.start()
    reader.start()
    thread.join(60)
    running.clear()
    reader.join(30)
    assert not thread.is_alive(), "dlw migrate still hangs after 60 s"
    return outcome[0], latencies, float(outcome[1])  # type: ignore[arg-type]


def test_an_idle_reporting_transaction_neither_hangs_migrate_nor_the_api(
    db: MigratedDb, analyst: SeededTenant, idle_reporting_transaction: psycopg.Connection, caplog
):
    caplog.set_level(logging.WARNING, logger="dlw.migrate")
    blocker = idle_reporting_transaction.info.backend_pid
    result, latencies, took = migrate_beside_quota_reads(db, analyst.tenant_id, **LOCKS)

    # The migrate gave up after its bounded retries, with one clear message naming the blocker.
    assert isinstance(result, MigrateLockTimeout), result
    message = str(result)
    assert "\n" not in message
    assert f"pid {blocker}" in message and analyst.login in message and "bi-tool" in message
    assert "idle in transaction" in message and "3 attempts" in message
    # Each wait was announced with what it waited for.
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) == 2 and all(f"pid {blocker}" in w and analyst.login in w for w in waits), waits
    # 3 waits of 1 s and backoffs of 0.5 s and 1 s, plus the work.
    assert 3 * LOCK_TIMEOUT <= took < 3 * LOCK_TIMEOUT + 1.5 + 5, took
    # The API was never stuck behind the migrate for much longer than one lock timeout.
    print(f"migrate gave up after {took:.1f} s; slowest /quota/current {max(latencies):.2f} s of {len(latencies)}")
    assert latencies and max(latencies) < 2 * LOCK_TIMEOUT, max(latencies)

    # Once the analyst's transaction ends, the same migrate succeeds.
    idle_reporting_transaction.rollback()
    assert migrate(db.owner_url, force_program=True, **LOCKS).program_applied


def test_migrate_retries_until_the_blocking_transaction_ends(
    db: MigratedDb, analyst: SeededTenant, idle_reporting_transaction: psycopg.Connection, caplog
):
    caplog.set_level(logging.WARNING, logger="dlw.migrate")
    timer = threading.Timer(1.5 * LOCK_TIMEOUT, idle_reporting_transaction.rollback)
    timer.start()
    try:
        result, latencies, took = migrate_beside_quota_reads(db, analyst.tenant_id, **LOCKS)
    finally:
        timer.cancel()
    assert not isinstance(result, Exception), result
    assert any("waiting for" in r.getMessage() and analyst.login in r.getMessage() for r in caplog.records)
    print(f"migrate succeeded after {took:.1f} s; slowest /quota/current {max(latencies):.2f} s")
    assert max(latencies) < 2 * LOCK_TIMEOUT


def test_the_command_fails_with_one_line_and_no_traceback(
    db: MigratedDb, analyst: SeededTenant, idle_reporting_transaction: psycopg.Connection
):
    blocker = idle_reporting_transaction.info.backend_pid
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "migrate",
            "--database-url",
            db.owner_url,
            "--reapply-sql",
            "--lock-timeout",
            "0.5",
            "--lock-attempts",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout == ""
    assert "Traceback" not in cli.stderr
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("dlw migrate: ") and f"pid {blocker}" in last and analyst.login in last, cli.stderr
    assert f"waiting for pid {blocker}" in cli.stderr  # the warning of the first attempt
