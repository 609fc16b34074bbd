"""Deactivating a tenant as a DBA (dlw_admin.deactivate_tenant): logins and new tasks refused,
live work cancelled, data still readable, and the quota lock ordering it with admissions in
flight (tests/support/dba.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.dba import Dba, audit_rows, dba, tenant_id
from tests.support.psql import lit, ok
from tests.support.tenants import as_tenant

__all__ = ["dba"]  # the module's DBA login (tests/support/dba.py)


# -- deactivation -----------------------------------------------------------------------------
def seed_live_work(db: MigratedDb, slug: str) -> dict[str, Any]:
    """Tasks in every state: pending (2 pending files), running (files assigned, running and
    succeeded), succeeded, failed; a user and a service account."""
    tid = tenant_id(db, slug)
    ids: dict[str, Any] = {"tenant": tid}
    with db.owner() as conn:
        p, s = conn.execute(
            "SELECT p.id, s.id FROM dlw.projects p, dlw.storage_targets s WHERE p.tenant_id = %s AND s.tenant_id = %s",
            (tid, tid),
        ).fetchone()

        def task(name: str, files: list[str]) -> Any:
            t = conn.execute(
                "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, file_count)"
                " VALUES (%s, %s, %s, %s, 'main', %s) RETURNING id",
                (tid, p, s, f"{slug}/{name}", len(files)),
            ).fetchone()[0]
            for path in files:
                conn.execute(
                    "INSERT INTO dlw.task_files (tenant_id, task_id, path, size) VALUES (%s, %s, %s, 10)",
                    (tid, t, path),
                )
            return t

        def file_to(t: Any, path: str, *statuses: str) -> None:
            for status in statuses:
                conn.execute(
                    "UPDATE dlw.task_files SET status = %s, assignment_token = gen_random_uuid(),"
                    " lease_expires_at = now() + interval '5 min', executor_id = 'ex-1'"
                    " WHERE tenant_id = %s AND task_id = %s AND path = %s",
                    (status, tid, t, path),
                )

        ids["pending"] = task("pending", ["a", "b"])
        ids["running"] = task("running", ["a", "b", "c"])
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["running"],))
        file_to(ids["running"], "a", "assigned")
        file_to(ids["running"], "b", "assigned", "running")
        file_to(ids["running"], "c", "assigned", "succeeded")
        ids["succeeded"] = task("succeeded", ["a"])
        file_to(ids["succeeded"], "a", "assigned", "succeeded")
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["succeeded"],))
        conn.execute("UPDATE dlw.tasks SET status = 'succeeded' WHERE id = %s", (ids["succeeded"],))
        ids["failed"] = task("failed", [])
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["failed"],))
        conn.execute("UPDATE dlw.tasks SET status = 'failed', error = 'boom' WHERE id = %s", (ids["failed"],))
        conn.execute(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, role)"
            " VALUES (%s, 'https://idp', %s, 'u@x', 'tenant_operator')",
            (tid, f"{slug}-user"),
        )
        conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, 'https://idp', %s, 'tenant_operator')",
            (tid, f"{slug}-robot"),
        )
    return ids


def create_task_as_app(db: MigratedDb, tid: int) -> str:
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_operator", user="someone")
        return str(
            conn.execute(
                "SELECT outcome FROM dlw.create_task(NULL, NULL, 'r/new', 'main', 0,"
                ' \'[{"path": "x", "size": 1}]\')'
            ).fetchone()[0]
        )


def test_deactivation_refuses_logins_and_new_tasks_cancels_live_work_and_keeps_data_readable(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('victor', 'Victor');")
    ids = seed_live_work(db, "victor")
    tid = ids["tenant"]
    login = dba.new_login("rep_victor")
    dba.run(f"SELECT dlw_admin.create_reporting_login({lit(login)}, 'victor', 'pw-victor');")

    out = dba.run("SELECT * FROM dlw_admin.deactivate_tenant('victor', reason => 'contract ended');")
    assert out == "2|4\n"  # the pending and running tasks; 2 + 2 unfinished files
    with db.owner() as conn:
        tasks = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, status, error, finished_at IS NOT NULL FROM dlw.tasks WHERE tenant_id = %s", (tid,)
            )
        }
        assert tasks[ids["pending"]] == ("cancelled", "tenant deactivated", True)
        assert tasks[ids["running"]] == ("cancelled", "tenant deactivated", True)
        assert tasks[ids["succeeded"]] == ("succeeded", None, True)
        assert tasks[ids["failed"]] == ("failed", "boom", True)
        files = conn.execute(
            "SELECT status, count(*), bool_and(assignment_token IS NULL AND lease_expires_at IS NULL)"
            " FROM dlw.task_files WHERE tenant_id = %s GROUP BY status ORDER BY status",
            (tid,),
        ).fetchall()
        assert files == [("cancelled", 4, True), ("succeeded", 2, False)]
    rows = audit_rows(db, "victor")
    deactivated = [r for r in rows if r[1] == "tenant.deactivated"]
    assert len(deactivated) == 1 and deactivated[0][0] == dba.login
    assert deactivated[0][3] == {
        "via": "dlw_admin.deactivate_tenant",
        "reason": "contract ended",
        "was_active": True,
        "tasks_cancelled": 2,
        "files_cancelled": 4,
    }
    assert sorted(r[2] for r in rows if r[1] == "task.cancelled") == sorted([str(ids["pending"]), str(ids["running"])])

    # Logins and service tokens are refused, with the codes the API turns into 403 TENANT_INACTIVE.
    with psycopg.connect(db.app_url) as conn:
        assert conn.execute(
            "SELECT outcome FROM dlw.login_user('https://idp', 'victor-user', 'u@x', true, NULL, NULL)"
        ).fetchone() == ("TENANT_INACTIVE",)
        assert conn.execute(
            "SELECT tenant_active FROM dlw.find_service_account('https://idp', 'victor-robot')"
        ).fetchone() == (False,)
    # New tasks are refused, in SQL and over HTTP; reading still works.
    assert create_task_as_app(db, tid) == "TENANT_INACTIVE"
    with TestClient(create_app(app_settings(db))) as client:
        operator = bearer(token(tid, "tenant_operator"))
        created = client.post(
            "/api/v1/tasks",
            headers=operator,
            json={"repo_id": "victor/x", "revision": "main", "files": [{"path": "a", "size": 1}]},
        )
        assert created.status_code == 403 and created.json()["detail"]["code"] == "TENANT_INACTIVE"
        listed = client.get("/api/v1/tasks", headers=operator)
        assert listed.status_code == 200 and len(listed.json()["items"]) == 4
    # Its reporting login still reads everything, cancellations included.
    out = ok(
        db.url(login, "pw-victor"),
        "SELECT active, concurrent_tasks FROM reporting.quota_status;"
        "SELECT status, count(*), max(error) FROM reporting.tasks GROUP BY status ORDER BY status;",
    )
    assert out.split("\n")[:4] == ["f|0", "cancelled|2|tenant deactivated", "failed|1|boom", "succeeded|1|"]

    # Again: nothing more to cancel. Reactivated: tasks are admitted again.
    assert dba.run("SELECT * FROM dlw_admin.deactivate_tenant('victor');") == "0|0\n"
    dba.run("SELECT dlw_admin.reactivate_tenant('victor');")
    assert create_task_as_app(db, tid) == "created"
    assert [r[1] for r in audit_rows(db, "victor") if r[1].startswith("tenant.")][-3:] == [
        "tenant.deactivated",
        "tenant.deactivated",
        "tenant.reactivated",
    ]


def _wait_for_lock(db: MigratedDb, login: str) -> None:
    with db.owner() as conn:
        for _ in range(200):
            row = conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'", (login,)
            ).fetchone()
            if row:
                return
            time.sleep(0.02)
    raise AssertionError(f"{login} never waited for a lock")


def test_an_admission_in_flight_finishes_first_and_its_task_is_cancelled(db: MigratedDb, dba: Dba):
    """Deactivation takes the tenant's quota lock (the one dlw.create_task holds until commit)."""
    dba.run("SELECT dlw_admin.create_tenant('vlock', 'Vlock');")
    tid = tenant_id(db, "vlock")
    results: list[Any] = []
    with psycopg.connect(db.app_url) as app:
        as_tenant(app, tid, "tenant_operator", user="someone")
        outcome = app.execute(
            "SELECT outcome FROM dlw.create_task(NULL, NULL, 'r/x', 'main', 0, '[{\"path\": \"x\", \"size\": 1}]')"
        ).fetchone()
        assert outcome == ("created",)

        def deactivate() -> None:
            with psycopg.connect(dba.url, autocommit=True) as conn:
                results.append(conn.execute("SELECT * FROM dlw_admin.deactivate_tenant('vlock')").fetchone())

        worker = threading.Thread(target=deactivate)
        worker.start()
        _wait_for_lock(db, dba.login)
        app.commit()
    worker.join(10)
    assert results == [(1, 1)]
    with db.owner() as conn:
        assert conn.execute("SELECT status FROM dlw.tasks WHERE tenant_id = %s", (tid,)).fetchall() == [("cancelled",)]


def test_an_admission_that_waited_behind_a_deactivation_is_refused(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('vwait', 'Vwait');")
    tid = tenant_id(db, "vwait")
    results: list[str] = []
    with psycopg.connect(dba.url) as admin:
        admin.execute("SELECT * FROM dlw_admin.deactivate_tenant('vwait')")  # holds the lock until commit
        worker = threading.Thread(target=lambda: results.append(create_task_as_app(db, tid)))
        worker.start()
        _wait_for_lock(db, "dlw_app")
        admin.commit()
    worker.join(10)
    assert results == ["TENANT_INACTIVE"]
