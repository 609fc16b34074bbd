"""Quota admission in SQL: the concurrency limit admits exactly its count whatever the crowd, and
the tenant's quota-row lock serialises creates and times out with 55P03 (tests/support/admission.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.admission import (
    FILES,
    audit_count,
    concurrently,
    create,
    live_tasks,
    max_parallel,
    provision,
    scalar,
)
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

# ------------------------------------------------------------------------------------------
# Concurrency limit: no over-admission
# ------------------------------------------------------------------------------------------


def test_200_simultaneous_creates_admit_exactly_the_concurrency_limit(db):
    tid = provision(db, "crowd", concurrent=10)
    n = max_parallel(db, 200)
    results = concurrently(db, [lambda c: create(c, tid, lock_timeout_ms=60000)] * n)
    errors_seen = [r for r in results if isinstance(r, Exception)]
    assert not errors_seen, errors_seen[:3]
    assert Counter(r[0] for r in results) == {"created": 10, "QUOTA_EXCEEDED": n - 10}
    assert {r[2] for r in results if r[0] == "QUOTA_EXCEEDED"} == {"concurrent_tasks"}
    assert {tuple(sorted(r[3].items())) for r in results if r[0] == "QUOTA_EXCEEDED"} == {
        (("current", 10), ("limit", 10), ("metric", "concurrent_tasks"), ("requested", 1))
    }
    assert live_tasks(db, tid) == 10
    assert scalar(db, "SELECT count(*) FROM dlw.task_files WHERE tenant_id = %s", (tid,)) == 10 * len(FILES)
    assert audit_count(db, tid, "quota.exceeded") == n - 10
    assert audit_count(db, tid, "task.created") == 10


def test_several_tenants_at_once_each_admit_exactly_their_own_limit(db):
    limits = {"multi-a": 3, "multi-b": 5, "multi-c": 7, "multi-d": 9}
    tids = {slug: provision(db, slug, concurrent=limit) for slug, limit in limits.items()}
    per_tenant = max_parallel(db, 160) // len(limits)
    jobs: list[Callable[[psycopg.Connection], Any]] = []
    for slug in limits:
        jobs += [lambda c, tid=tids[slug]: (tid, create(c, tid, lock_timeout_ms=60000))] * per_tenant
    results = concurrently(db, jobs)
    assert not [r for r in results if isinstance(r, Exception)]
    for slug, limit in limits.items():
        outcomes = Counter(res[0] for tid, res in results if tid == tids[slug])
        assert outcomes == {"created": limit, "QUOTA_EXCEEDED": per_tenant - limit}, slug
        assert live_tasks(db, tids[slug]) == limit
        assert audit_count(db, tids[slug], "quota.exceeded") == per_tenant - limit


def test_a_brand_new_tenant_hit_by_concurrent_first_creates_admits_exactly_its_limit(db):
    tid = provision(db, "newborn", concurrent=5)
    assert scalar(db, "SELECT count(*) FROM dlw.quota_snapshots WHERE tenant_id = %s", (tid,)) == 0
    results = concurrently(db, [lambda c: create(c, tid, lock_timeout_ms=60000)] * 50)
    assert not [r for r in results if isinstance(r, Exception)]
    assert Counter(r[0] for r in results) == {"created": 5, "QUOTA_EXCEEDED": 45}
    assert live_tasks(db, tid) == 5
    # the rows that were created to be locked: the previous and the current UTC month
    assert scalar(
        db,
        "SELECT array_agg(period ORDER BY period) = ARRAY[dlw.month_start(now()) - interval '1 month',"
        " dlw.month_start(now())]::date[] FROM dlw.quota_snapshots WHERE tenant_id = %s",
        (tid,),
    )


def test_a_cancelled_task_frees_its_slot(db):
    tid = provision(db, "slot", concurrent=1)
    with psycopg.connect(db.app_url) as conn:
        outcome, first, _, _ = create(conn, tid)
        assert outcome == "created"
        assert create(conn, tid)[0] == "QUOTA_EXCEEDED"
        as_tenant(conn, tid, "tenant_operator", user="user-1")
        assert conn.execute("SELECT dlw.cancel_task(%s)", (first,)).fetchone() == ("cancelled",)
        conn.commit()
        assert create(conn, tid)[0] == "created"


def test_unlimited_concurrency_is_zero(db):
    tid = provision(db, "unlimited", concurrent=0)
    with psycopg.connect(db.app_url) as conn:
        assert {create(conn, tid)[0] for _ in range(15)} == {"created"}


# ------------------------------------------------------------------------------------------
# Locking
# ------------------------------------------------------------------------------------------


def test_a_held_quota_lock_times_out_with_55p03_and_blocks_no_other_tenant(db):
    x = provision(db, "holder", concurrent=10)
    y = provision(db, "bystander", concurrent=10)
    with psycopg.connect(db.app_url) as holder, psycopg.connect(db.app_url) as other:
        assert create(holder, x, commit=False)[0] == "created"  # lock held: not committed

        started = time.monotonic()
        assert create(other, y, lock_timeout_ms=200)[0] == "created"
        assert time.monotonic() - started < 1.0

        started = time.monotonic()
        with pytest.raises(errors.LockNotAvailable) as exc_info:
            create(other, x, lock_timeout_ms=200)
        assert exc_info.value.sqlstate == "55P03"
        assert 0.15 < time.monotonic() - started < 2.0
        other.rollback()
        holder.commit()
    assert live_tasks(db, x) == 1


def assert_create_waits_for_the_row_lock(db: MigratedDb, tid: int, period_sql: str) -> None:
    """While another transaction holds the tenant's quota row for `period_sql` FOR UPDATE, a create
    gives up after its lock_timeout (LockNotAvailable) instead of admitting without the lock."""
    with db.owner() as owner, psycopg.connect(db.app_url) as conn:
        owner.execute("BEGIN")
        owner.execute(
            "SELECT 1 FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = " + period_sql + " FOR UPDATE",
            (tid,),
        )
        with pytest.raises(errors.LockNotAvailable):
            create(conn, tid, lock_timeout_ms=200)
        conn.rollback()
        owner.execute("ROLLBACK")


def test_the_quota_row_lock_held_by_someone_else_times_out(db):
    tid = provision(db, "locked", concurrent=10)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "created"  # the quota rows now exist
    assert_create_waits_for_the_row_lock(db, tid, "dlw.month_start(now())")


def test_a_create_straddling_the_month_boundary_still_serialises(db):
    """A rival whose transaction began last month locks last month's row; a create this month
    locks that row too, so the two cannot both count the live tasks without the other."""
    tid = provision(db, "straddle", concurrent=10)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "created"
    assert_create_waits_for_the_row_lock(db, tid, "dlw.month_start(now()) - interval '1 month'")


def test_lock_timeout_is_restored_after_admission(db):
    tid = provision(db, "restore", concurrent=10)
    with psycopg.connect(db.app_url) as conn:
        conn.execute("SELECT set_config('lock_timeout', '7s', true)")
        assert create(conn, tid, lock_timeout_ms=123, commit=False)[0] == "created"
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)
        conn.rollback()
