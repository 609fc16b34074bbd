"""Quota admission in SQL: tasks created per minute (cancelled ones count), and the order in which
the limits are checked (tests/support/admission.py).
"""

from __future__ import annotations

from collections import Counter

import psycopg

from tests.support.admission import audit_count, concurrently, create, max_parallel, one_file, provision, scalar
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

# ------------------------------------------------------------------------------------------
# Tasks per minute
# ------------------------------------------------------------------------------------------


def set_rate(db: MigratedDb, tenant_id: int, per_minute: int) -> None:
    with db.owner() as owner:
        owner.execute(
            "UPDATE dlw.tenants SET quota_tasks_per_minute = %s WHERE tenant_id = %s", (per_minute, tenant_id)
        )


def test_a_create_then_cancel_flood_is_refused_at_the_rate_limit(db):
    """The attack: create, cancel, create, ... never holds a live task, so the concurrency limit
    never bit, and the loop filled the tables. Cancelled tasks count against the rate."""
    tid = provision(db, "flood", concurrent=1)
    set_rate(db, tid, 5)
    with psycopg.connect(db.app_url) as conn:
        for _ in range(5):
            outcome, task, _, _ = create(conn, tid)
            assert outcome == "created"
            as_tenant(conn, tid, "tenant_operator", user="user-1")
            assert conn.execute("SELECT dlw.cancel_task(%s)", (task,)).fetchone() == ("cancelled",)
            conn.commit()
        for _ in range(20):
            outcome, task, metric, detail = create(conn, tid)
            assert (outcome, task, metric) == ("QUOTA_EXCEEDED", None, "tasks_per_minute")
        assert detail == {"metric": "tasks_per_minute", "limit": 5, "current": 5, "requested": 1}
        assert audit_count(db, tid, "quota.exceeded") == 20
        assert (
            scalar(db, "SELECT count(*) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'quota.exceeded'", (tid,))
            <= 2
        )
        as_tenant(conn, tid, "tenant_viewer", user="user-1")
        assert conn.execute("SELECT tasks_last_minute, tasks_per_minute_quota FROM dlw.quota_current()").fetchone() == (
            5,
            5,
        )
        conn.commit()
        # a minute later the window is empty again
        with db.owner() as owner:
            owner.execute(
                "UPDATE dlw.tasks SET created_at = created_at - interval '61 seconds' WHERE tenant_id = %s", (tid,)
            )
        assert create(conn, tid)[0] == "created"
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 6


def test_200_simultaneous_creates_admit_exactly_the_rate_limit(db):
    tid = provision(db, "rate-crowd", concurrent=0)
    set_rate(db, tid, 25)
    n = max_parallel(db, 200)
    results = concurrently(db, [lambda c: create(c, tid, lock_timeout_ms=60000)] * n)
    assert not [r for r in results if isinstance(r, Exception)]
    assert Counter(r[0] for r in results) == {"created": 25, "QUOTA_EXCEEDED": n - 25}
    assert {r[2] for r in results if r[0] == "QUOTA_EXCEEDED"} == {"tasks_per_minute"}
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 25
    assert audit_count(db, tid, "quota.exceeded") == n - 25


def test_unlimited_rate_is_zero(db):
    tid = provision(db, "no-rate", concurrent=0)
    set_rate(db, tid, 0)
    with psycopg.connect(db.app_url) as conn:
        assert {create(conn, tid)[0] for _ in range(3)} == {"created"}


# ------------------------------------------------------------------------------------------
# Order of the checks
# ------------------------------------------------------------------------------------------


def test_the_concurrency_limit_is_checked_before_bytes(db):
    tid = provision(db, "both", concurrent=1, bytes_month=10)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid, files=one_file(5))[0] == "created"
        assert create(conn, tid, files=one_file(50))[2] == "concurrent_tasks"
