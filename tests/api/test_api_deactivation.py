"""Deactivating a tenant through the API (`PATCH /api/v1/tenants/{id}` with `active: false`,
dlw.platform_update_tenant) does what the DBA's dlw_admin.deactivate_tenant does, through the
same SQL helper (dlw.deactivate_tenant_in): it serialises with admission on the quota rows, so
no task is admitted once it commits, and it cancels live tasks and drops executors' leases."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from app.api.factory import create_app
from tests.support.app import ADMIN_TOKEN, app_settings, bearer
from tests.support.database import MigratedDb
from tests.support.executor_sql import Executor, make_task
from tests.support.tenants import as_tenant

SYSTEM = bearer(ADMIN_TOKEN)
CREATORS = 6
FILES = Jsonb([{"path": "a.bin", "size": 10}, {"path": "b.bin", "size": 10}])


def create_loop(db: MigratedDb, tenant_id: int, stop: threading.Event, out: list[tuple[float, str]]) -> None:
    """Creates tasks as an operator, one transaction each, until told to stop; records when each
    attempt started and its outcome."""
    with psycopg.connect(db.app_url) as conn:
        while not stop.is_set():
            started = time.monotonic()
            as_tenant(conn, tenant_id, "tenant_operator", user="racer")
            row = conn.execute(
                "SELECT outcome FROM dlw.create_task(NULL, 'default', 'race/model', 'main', 0, %s)", (FILES,)
            ).fetchone()
            conn.commit()
            assert row is not None
            out.append((started, str(row[0])))


def test_api_deactivation_admits_nothing_after_it_commits_and_stops_live_work(db: MigratedDb):
    with TestClient(create_app(app_settings(db, oidc_issuer="https://idp.example"))) as client:
        created = client.post(
            "/api/v1/tenants",
            headers=SYSTEM,
            json={"slug": "api-stop", "display_name": "Api Stop", "quota_concurrent": 0, "quota_bytes_month": 0},
        )
        assert created.status_code == 201, created.text
        tid = int(created.json()["tenant_id"])
        with db.owner() as owner:
            owner.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 0 WHERE tenant_id = %s", (tid,))
        # Work in flight: a task whose first file an executor of this tenant holds a lease on.
        task, _ = make_task(db, tid, 2)
        executor = Executor(db, tenant=tid, subject="stop-exec")
        try:
            [claimed] = executor.claim(1)
            file, lease = claimed["file_id"], claimed["assignment_token"]
            assert executor.heartbeat(file, lease, 5) == "ok"

            stop = threading.Event()
            outcomes: list[tuple[float, str]] = []
            creators = [threading.Thread(target=create_loop, args=(db, tid, stop, outcomes)) for _ in range(CREATORS)]
            for thread in creators:
                thread.start()
            deadline = time.monotonic() + 20
            while sum(o == "created" for _, o in outcomes) < 30:
                assert time.monotonic() < deadline, "the creators admitted nothing"
                time.sleep(0.01)
            patched = client.patch(f"/api/v1/tenants/{tid}", headers=SYSTEM, json={"active": False})
            committed = time.monotonic()
            time.sleep(0.5)  # creates keep coming after the deactivation committed
            stop.set()
            for thread in creators:
                thread.join(20)
            assert patched.status_code == 200, patched.text
            assert patched.json()["active"] is False

            after = [o for started, o in outcomes if started > committed]
            assert len(after) >= CREATORS and set(after) == {"TENANT_INACTIVE"}
            admitted = sum(o == "created" for _, o in outcomes)
            with db.owner() as owner:
                statuses = owner.execute(
                    "SELECT status, count(*) FROM dlw.tasks WHERE tenant_id = %s GROUP BY status", (tid,)
                ).fetchall()
                files = owner.execute(
                    "SELECT status, count(*), bool_and(assignment_token IS NULL AND lease_expires_at IS NULL)"
                    " FROM dlw.task_files WHERE tenant_id = %s GROUP BY status",
                    (tid,),
                ).fetchall()
                cancelled_rows = owner.execute(
                    "SELECT count(*) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'task.cancelled'"
                    " AND detail->>'via' = 'api' AND actor = 'service:system-admin'",
                    (tid,),
                ).fetchone()
                updated = owner.execute(
                    "SELECT detail->'tasks_cancelled', detail->'files_cancelled' FROM dlw.audit_log"
                    " WHERE tenant_id = %s AND action = 'tenant.updated'",
                    (tid,),
                ).fetchall()
            # Every admitted task (and the one in flight) was live when the deactivation took the
            # quota lock, so it was cancelled; none was admitted after the commit.
            assert statuses == [("cancelled", admitted + 1)], (statuses, admitted)
            assert files == [("cancelled", 2 * (admitted + 1), True)]
            assert cancelled_rows == (admitted + 1,)
            assert updated == [(admitted + 1, 2 * (admitted + 1))]
            # The executor's lease is gone and there is nothing more to claim.
            assert executor.heartbeat(file, lease, 6) == "LEASE_LOST"
            assert executor.complete(file, lease)[0] == "LEASE_LOST"
            assert executor.claim(5) == []
            assert isinstance(task, uuid.UUID)
        finally:
            executor.close()

        # Again: nothing more to cancel; reactivated, tasks are admitted again.
        assert client.patch(f"/api/v1/tenants/{tid}", headers=SYSTEM, json={"active": False}).status_code == 200
        assert client.patch(f"/api/v1/tenants/{tid}", headers=SYSTEM, json={"active": True}).status_code == 200
        make_task(db, tid, 1)
