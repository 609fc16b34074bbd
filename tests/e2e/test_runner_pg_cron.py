"""The snapshot runner with pg_cron: on a Debian PostgreSQL 15 that preloads pg_cron 1.4,
`dlw migrate` schedules a one-minute job, the job really runs and folds the usage, and the API
runs no loop of its own.

The cluster's cron.database_name is one DLW database (the job is scheduled there with
cron.schedule); a second DLW database on the same server gets its job through
cron.schedule_in_database from the first, as on a server whose pg_cron lives in `postgres`.
pg_cron 1.4 has one-minute granularity, so this waits for the next minute boundary (< 60 s).

Needs postgresql-15 and postgresql-15-cron (installed by .ci/run). Without them the test skips
with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from app.api.factory import create_app
from app.ops.embedded import LocalCluster, debian_bindir
from app.ops.migrate import CRON_COMMAND, CRON_JOB, migrate
from tests.support.app import app_settings
from tests.support.database import MigratedDb, PgServer, free_port
from tests.support.requirements import require

CRON_DB = "dlw_cron"
OTHER_DB = "dlw_cron_other"


def missing_pg_cron() -> str | None:
    bindir = debian_bindir(15)
    if bindir is None:
        return "Debian PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin/postgres)"
    if not (bindir.parent / "lib" / "pg_cron.so").exists():
        return "pg_cron for PostgreSQL 15 is not installed (apt-get install postgresql-15-cron)"
    return None


@pytest.fixture(scope="module")
def cron_server() -> Iterator[PgServer]:
    require(missing_pg_cron(), "the pg_cron runner test")
    bindir = debian_bindir(15)
    assert bindir is not None
    workdir = Path(tempfile.mkdtemp(prefix="dlw-cron-"))
    cluster = LocalCluster(
        workdir / "pgdata",
        bindir=bindir,
        port=free_port(),
        preload_libraries=("pg_cron",),
        extra_settings={
            "cron.database_name": f"'{CRON_DB}'",
            "cron.use_background_workers": "on",  # jobs run in background workers: no libpq login
            "max_worker_processes": "16",
            "fsync": "off",
            "synchronous_commit": "off",
        },
    )
    cluster.start()
    try:
        server = PgServer(cluster.url(), "debian-15-pg_cron", secrets.token_urlsafe(18))
        for name in (CRON_DB, OTHER_DB):
            server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield server
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def jobs(server: PgServer) -> list[tuple[str, str, str, str, bool]]:
    with psycopg.connect(server.url(CRON_DB)) as conn:
        return [
            (r[0], r[1], r[2], r[3], r[4])
            for r in conn.execute("SELECT jobname, schedule, command, database, active FROM cron.job ORDER BY jobname")
        ]


def test_migrate_schedules_a_one_minute_job_that_folds_usage(cron_server: PgServer):
    server = cron_server
    started = time.monotonic()
    results = [migrate(server.url(name)) for name in (CRON_DB, OTHER_DB)]
    assert [r.snapshot_runner for r in results] == ["pg_cron", "pg_cron"]
    expected = [
        (CRON_JOB, "* * * * *", CRON_COMMAND, CRON_DB, True),
        (f"{CRON_JOB}:{OTHER_DB}", "* * * * *", CRON_COMMAND, OTHER_DB, True),
    ]
    assert jobs(server) == expected
    # Idempotent: migrating again keeps one job per database.
    assert migrate(server.url(OTHER_DB)).snapshot_runner == "pg_cron"
    assert migrate(server.url(CRON_DB), force_program=True).snapshot_runner == "pg_cron"
    assert jobs(server) == expected

    tenants: dict[str, int] = {}
    for name in (CRON_DB, OTHER_DB):
        with psycopg.connect(server.url(name)) as conn:
            state = conn.execute("SELECT runner, runner_detail, refreshed_at FROM dlw.snapshot_state").fetchone()
            assert state[0] == "pg_cron" and state[2] is None
            assert f"in database {CRON_DB}" in state[1]
            tenant = conn.execute("SELECT dlw.provision_tenant('cron', 'Cron', 0, 0, 0)").fetchone()[0]
            for amount in (100, 23):
                conn.execute(
                    "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
                    " VALUES (%s, 'bytes_month', %s, %s)",
                    (tenant, amount, f"cron:{uuid.uuid4()}"),
                )
            tenants[name] = int(tenant)

    # The API on this server sees the job and runs no refresh loop of its own.
    server.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(server.app_password)))
    with TestClient(create_app(app_settings(MigratedDb(server, OTHER_DB)))) as client:
        runner = client.app.state.snapshot_runner  # type: ignore[attr-defined]
        assert runner.mode == "pg_cron" and runner._task is None

    # pg_cron runs both jobs at the next minute boundary.
    deadline = time.monotonic() + 75
    pending = set(tenants)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            with psycopg.connect(server.url(name)) as conn:
                if conn.execute("SELECT refreshed_at IS NOT NULL FROM dlw.snapshot_state").fetchone()[0]:
                    pending.discard(name)
        time.sleep(0.5)
    assert not pending, f"pg_cron did not refresh {pending} within 75 s"
    print(f"pg_cron refreshed both databases {time.monotonic() - started:.0f} s after migrate")
    finished: list[tuple[str, str]] = []
    while time.monotonic() < deadline + 10:
        with psycopg.connect(server.url(CRON_DB)) as conn:
            finished = conn.execute(
                "SELECT j.jobname, d.status FROM cron.job_run_details d JOIN cron.job j USING (jobid)"
                " WHERE d.status <> 'running' ORDER BY d.start_time"
            ).fetchall()
        if {name for name, _ in finished} == {CRON_JOB, f"{CRON_JOB}:{OTHER_DB}"}:
            break
        time.sleep(0.2)
    assert {name for name, _ in finished} == {CRON_JOB, f"{CRON_JOB}:{OTHER_DB}"}
    assert {status for _, status in finished} == {"succeeded"}

    for name, tenant in tenants.items():
        with psycopg.connect(server.url(name)) as conn:
            amount = conn.execute(
                "SELECT amount FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = dlw.month_start(now())",
                (tenant,),
            ).fetchone()
            assert amount == (123,), name
            assert conn.execute("SELECT count(*) FROM dlw.quota_drift()").fetchone()[0] == 0
