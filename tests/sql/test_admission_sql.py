"""Quota admission in SQL (dlw.create_task, "insert-then-lock"), driven as the API's role.

Each simulated request is one dlw_app transaction: dlw.set_context(), dlw.create_task(), commit.
Concurrency uses real threads, each with its own connection, released together by a barrier.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from app.ops.catalog_check import check_catalog
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

CREATE_SQL = "SELECT outcome, task_id, metric, detail FROM dlw.create_task(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
FILES = [{"path": "config.json", "size": 10}, {"path": "model.safetensors", "size": 90, "sha256": "ab" * 32}]


def provision(db: MigratedDb, slug: str, concurrent: int = 10, bytes_month: int = 0) -> int:
    return tenant(db, slug, name=slug.title(), concurrent=concurrent, bytes_month=bytes_month, storage_gb=100)


def create(
    conn: psycopg.Connection,
    tenant_id: int,
    *,
    role: str = "tenant_operator",
    files: list[dict[str, Any]] | None = None,
    key: str | None = None,
    request_hash: bytes | None = None,
    lock_timeout_ms: int | None = 5000,
    project: uuid.UUID | None = None,
    target: str | None = "default",
    commit: bool = True,
    repo: str = "org/model",
) -> tuple[str, uuid.UUID | None, str | None, dict[str, Any] | None]:
    """One API request: set the context, create, commit (unless told not to)."""
    as_tenant(conn, tenant_id, role, user="user-1")
    row = conn.execute(
        CREATE_SQL,
        (
            project,
            target,
            repo,
            "main",
            0,
            Jsonb(FILES if files is None else files),
            key,
            request_hash if request_hash is not None else (b"h" if key else None),
            lock_timeout_ms,
        ),
    ).fetchone()
    assert row is not None
    if commit:
        conn.commit()
    return row[0], row[1], row[2], row[3]


def concurrently(db: MigratedDb, jobs: list[Callable[[psycopg.Connection], Any]]) -> list[Any]:
    """Run each job in its own thread and dlw_app connection; connections are opened first and
    the jobs released together. Returns each job's result or the exception it raised."""
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs), timeout=60)

    def worker(i: int) -> None:
        try:
            with psycopg.connect(db.app_url) as conn:
                barrier.wait()
                results[i] = jobs[i](conn)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return results


def scalar(db: MigratedDb, query: str, params: tuple[Any, ...] = ()) -> Any:
    with db.owner() as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def live_tasks(db: MigratedDb, tenant_id: int) -> int:
    return int(
        scalar(
            db,
            "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s AND status IN ('pending', 'running')",
            (tenant_id,),
        )
    )


def audit_count(db: MigratedDb, tenant_id: int, action: str) -> int:
    """How many times the action was audited (a repeat row stands for `count` occurrences)."""
    return int(
        scalar(
            db,
            "SELECT coalesce(sum(count), 0) FROM dlw.audit_log WHERE tenant_id = %s AND action = %s",
            (tenant_id, action),
        )
    )


def max_parallel(db: MigratedDb, wanted: int) -> int:
    """How many client connections the server can take at once, keeping a margin."""
    max_conn = int(scalar(db, "SHOW max_connections"))
    return min(wanted, max_conn - 30)


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


# ------------------------------------------------------------------------------------------
# Bytes per UTC month
# ------------------------------------------------------------------------------------------


def add_usage(db: MigratedDb, tenant_id: int, amount: int, occurred_at_sql: str) -> None:
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, occurred_at)"
            f" VALUES (%s, 'bytes_month', %s, %s, {occurred_at_sql})",
            (tenant_id, amount, f"evt:{uuid.uuid4()}"),
        )


def fold_everything(db: MigratedDb) -> None:
    """What the snapshot refresher does: add unfolded usage to each (tenant, month) snapshot and
    move the cursor past those rows, in one transaction."""
    with db.owner() as conn, conn.transaction():
        conn.execute("""
            WITH s AS (SELECT folded_below FROM dlw.snapshot_state FOR UPDATE),
                 agg AS (SELECT u.tenant_id, dlw.month_start(u.occurred_at) AS period, sum(u.amount) AS amount
                         FROM dlw.usage_records u, s WHERE u.xid >= s.folded_below GROUP BY 1, 2)
            INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
            SELECT tenant_id, period, 'bytes_month', amount, now() FROM agg
            ON CONFLICT (tenant_id, period, metric)
            DO UPDATE SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at""")
        conn.execute("""
            UPDATE dlw.snapshot_state
            SET folded_below = coalesce((SELECT (max(xid)::text::bigint + 1)::text::xid8 FROM dlw.usage_records),
                                        folded_below),
                refreshed_at = now()""")


def bytes_used(db: MigratedDb, tenant_id: int) -> int:
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenant_id, "tenant_viewer", user="user-1")
        row = conn.execute("SELECT bytes_used_month FROM dlw.quota_current()").fetchone()
        assert row is not None
        return int(row[0])


def one_file(size: int) -> list[dict[str, Any]]:
    return [{"path": f"blob-{uuid.uuid4().hex}", "size": size}]


def test_month_start_is_the_utc_calendar_month_whatever_the_session_time_zone(db):
    with db.owner() as conn:
        for tz in ("UTC", "Pacific/Kiritimati", "Etc/GMT+12"):
            conn.execute("SELECT set_config('TimeZone', %s, false)", (tz,))
            got = conn.execute(
                "SELECT dlw.month_start('2024-02-29 23:59:59.999999+00'), dlw.month_start('2024-03-01 00:00:00+00'),"
                " dlw.month_start('2024-03-01 05:00:00+14'), dlw.month_start('2023-12-31 23:00:00-02')"
            ).fetchone()
            assert [str(d) for d in got] == ["2024-02-01", "2024-03-01", "2024-02-01", "2024-01-01"], tz


def test_bytes_quota_counts_this_utc_month_folded_and_unfolded(db):
    tid = provision(db, "bytes", concurrent=0, bytes_month=1000)
    with psycopg.connect(db.app_url) as conn:

        def admit(size: int) -> tuple[str, str | None, dict[str, Any] | None]:
            """Create a task of `size` bytes; cancel it at once, so it reserves nothing after."""
            outcome, task, metric, detail = create(conn, tid, files=one_file(size))
            if task is not None:
                as_tenant(conn, tid, "tenant_operator", user="user-1")
                assert conn.execute("SELECT dlw.cancel_task(%s)", (task,)).fetchone() == ("cancelled",)
                conn.commit()
            return outcome, metric, detail

        assert admit(1001) == (
            "QUOTA_EXCEEDED",
            "bytes_month",
            {"metric": "bytes_month", "limit": 1000, "current": 0, "reserved": 0, "requested": 1001},
        )
        assert audit_count(db, tid, "quota.exceeded") == 1
        assert admit(1000)[0] == "created"

        # last month's usage, a microsecond before this UTC month began: does not count
        add_usage(db, tid, 900, "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'")
        assert bytes_used(db, tid) == 0
        assert admit(1000)[0] == "created"

        # this month's usage, at the very first instant of the month, not folded yet: counts
        add_usage(db, tid, 300, "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC'")
        assert bytes_used(db, tid) == 300
        assert admit(701) == (
            "QUOTA_EXCEEDED",
            "bytes_month",
            {"metric": "bytes_month", "limit": 1000, "current": 300, "reserved": 0, "requested": 701},
        )
        assert admit(700)[0] == "created"

        # folded into the snapshot: still counts, exactly once
        fold_everything(db)
        assert scalar(db, "SELECT folded_below > '0' FROM dlw.snapshot_state")
        assert (
            scalar(
                db,
                "SELECT amount FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = dlw.month_start(now())",
                (tid,),
            )
            == 300
        )
        assert bytes_used(db, tid) == 300
        assert admit(701)[0] == "QUOTA_EXCEEDED"
        assert admit(700)[0] == "created"

        # folded plus new unfolded usage
        add_usage(db, tid, 100, "now()")
        assert bytes_used(db, tid) == 400
        assert admit(601)[1] == "bytes_month"
        assert admit(600)[0] == "created"
        assert audit_count(db, tid, "quota.exceeded") == 4


def finish_file(db: MigratedDb, file_id: uuid.UUID, outcome: str) -> None:
    """What an executor's report does to a file (as the owner): succeeded appends its usage."""
    with db.owner() as conn, conn.transaction():
        conn.execute("UPDATE dlw.task_files SET status = 'assigned' WHERE id = %s", (file_id,))
        tenant_id, task_id, size = conn.execute(
            "UPDATE dlw.task_files SET status = %s, bytes_done = size WHERE id = %s RETURNING tenant_id, task_id, size",
            (outcome, file_id),
        ).fetchone()
        if outcome == "succeeded":
            conn.execute(
                "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id)"
                " VALUES (%s, 'bytes_month', %s, %s, %s, %s)",
                (tenant_id, size, f"file:{file_id}", task_id, file_id),
            )


def test_live_tasks_reserve_their_still_to_download_bytes(db):
    """The attack: three 80-byte tasks against a 100-byte month all passed, because only usage
    already downloaded was counted. Admission now reserves what it admits."""
    tid = provision(db, "reserve", concurrent=0, bytes_month=100)
    two = [{"path": "a", "size": 30}, {"path": "b", "size": 50}]
    with psycopg.connect(db.app_url) as conn:
        outcome, first, _, _ = create(conn, tid, files=two)
        assert outcome == "created"
        assert create(conn, tid, files=one_file(80))[2:] == (
            "bytes_month",
            {"metric": "bytes_month", "limit": 100, "current": 0, "reserved": 80, "requested": 80},
        )
        assert create(conn, tid, files=one_file(21))[0] == "QUOTA_EXCEEDED"
        assert create(conn, tid, files=one_file(20))[0] == "created"  # 80 + 20 = 100: fits exactly
        assert create(conn, tid, files=one_file(1))[0] == "QUOTA_EXCEEDED"
        with db.owner() as owner:
            files = dict(owner.execute("SELECT path, id FROM dlw.task_files WHERE task_id = %s", (first,)).fetchall())
        # a downloaded file moves from reserved to used (100 still taken); a failed one frees its bytes
        finish_file(db, files["a"], "succeeded")
        assert create(conn, tid, files=one_file(1))[0] == "QUOTA_EXCEEDED"
        as_tenant(conn, tid, "tenant_viewer", user="user-1")
        assert conn.execute("SELECT bytes_used_month, bytes_reserved FROM dlw.quota_current()").fetchone() == (30, 70)
        conn.commit()
        finish_file(db, files["b"], "failed")
        assert create(conn, tid, files=one_file(51))[0] == "QUOTA_EXCEEDED"
        outcome, third, _, _ = create(conn, tid, files=one_file(50))
        assert outcome == "created"
        # cancelling a task releases what it reserved
        as_tenant(conn, tid, "tenant_operator", user="user-1")
        assert conn.execute("SELECT dlw.cancel_task(%s)", (third,)).fetchone() == ("cancelled",)
        conn.commit()
        assert create(conn, tid, files=one_file(50))[0] == "created"


def test_200_simultaneous_creates_reserve_no_more_than_the_byte_quota(db):
    tid = provision(db, "reserve-crowd", concurrent=0, bytes_month=1000)  # FILES: 100 bytes a task
    with db.owner() as owner:
        owner.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 0 WHERE tenant_id = %s", (tid,))
    n = max_parallel(db, 200)
    results = concurrently(db, [lambda c: create(c, tid, lock_timeout_ms=60000)] * n)
    assert not [r for r in results if isinstance(r, Exception)]
    assert Counter(r[0] for r in results) == {"created": 10, "QUOTA_EXCEEDED": n - 10}
    assert {r[2] for r in results if r[0] == "QUOTA_EXCEEDED"} == {"bytes_month"}
    assert {r[3]["reserved"] for r in results if r[0] == "QUOTA_EXCEEDED"} == {1000}
    assert scalar(db, "SELECT sum(total_bytes) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 1000
    assert audit_count(db, tid, "quota.exceeded") == n - 10


def test_the_reserved_bytes_are_summed_from_the_live_files_index(db):
    with db.owner() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT coalesce(sum(f.size), 0) FROM dlw.task_files f"
            " WHERE f.tenant_id = 1 AND f.status IN ('pending', 'assigned', 'running')"
        ).fetchone()[0]
    assert "task_files_tenant_unfinished" in str(plan)


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


def test_the_concurrency_limit_is_checked_before_bytes(db):
    tid = provision(db, "both", concurrent=1, bytes_month=10)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid, files=one_file(5))[0] == "created"
        assert create(conn, tid, files=one_file(50))[2] == "concurrent_tasks"


def test_the_api_role_cannot_move_the_quota_month(db):
    """There is no clock setting to cheat with: the session time zone and any dlw.* setting
    leave the period at the server's current UTC month."""
    tid = provision(db, "clock", concurrent=0, bytes_month=1000)
    add_usage(db, tid, 1000, "now()")
    with psycopg.connect(db.app_url) as conn:
        conn.execute("SET TimeZone = 'Pacific/Kiritimati'")
        conn.execute(
            "SELECT set_config('dlw.test_now', '2000-01-01', false), set_config('dlw.now', '2000-01-01', false)"
        )
        assert create(conn, tid, files=one_file(1))[0] == "QUOTA_EXCEEDED"
        as_tenant(conn, tid, "tenant_viewer", user="user-1")
        assert conn.execute("SELECT period = dlw.month_start(now()) FROM dlw.quota_current()").fetchone() == (True,)


# ------------------------------------------------------------------------------------------
# Idempotency
# ------------------------------------------------------------------------------------------


def test_50_concurrent_retries_with_one_key_create_one_task(db):
    tid = provision(db, "idem", concurrent=100)
    results = concurrently(db, [lambda c: create(c, tid, key="k-1", request_hash=b"same", lock_timeout_ms=60000)] * 50)
    assert not [r for r in results if isinstance(r, Exception)]
    assert Counter(r[0] for r in results) == {"created": 1, "existing": 49}
    assert len({r[1] for r in results}) == 1
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 1
    assert (
        scalar(db, "SELECT task_id FROM dlw.idempotency_keys WHERE tenant_id = %s AND key = 'k-1'", (tid,))
        == (results[0][1])
    )


def test_same_key_other_body_is_a_conflict_and_a_retry_survives_a_full_quota(db):
    tid = provision(db, "idem-b", concurrent=1)
    with psycopg.connect(db.app_url) as conn:
        outcome, task, _, _ = create(conn, tid, key="k", request_hash=b"one")
        assert outcome == "created"
        # the quota is full now, but a retry of the admitted request returns its task
        assert create(conn, tid, key="k", request_hash=b"one")[:2] == ("existing", task)
        assert create(conn, tid, key="k", request_hash=b"two")[:2] == ("IDEMPOTENCY_CONFLICT", None)
        assert create(conn, tid, key="other", request_hash=b"one")[0] == "QUOTA_EXCEEDED"
        # keys are per tenant: another tenant may use the same key
        other = provision(db, "idem-c", concurrent=1)
        assert create(conn, other, key="k", request_hash=b"two")[0] == "created"
        with pytest.raises(errors.NullValueNotAllowed):
            as_tenant(conn, tid, "tenant_admin", user="u")
            conn.execute(CREATE_SQL, (None, None, "r", "main", 0, Jsonb([]), "k2", None, None))
        conn.rollback()


# ------------------------------------------------------------------------------------------
# Lookups, refusals and defense in depth
# ------------------------------------------------------------------------------------------


def test_projects_and_targets_resolve_only_within_the_tenant(db):
    a = provision(db, "look-a")
    b = provision(db, "look-b")
    with db.owner() as owner:
        b_project = owner.execute("SELECT id FROM dlw.projects WHERE tenant_id = %s", (b,)).fetchone()[0]
        b_target = owner.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (b,)).fetchone()[0]
        a_target = owner.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (a,)).fetchone()[0]
        a_project = owner.execute("SELECT id FROM dlw.projects WHERE tenant_id = %s", (a,)).fetchone()[0]
        owner.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'fast')", (b,))
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, a, project=b_project)[0] == "UNKNOWN_PROJECT"
        assert create(conn, a, project=uuid.uuid4())[0] == "UNKNOWN_PROJECT"
        assert create(conn, a, target=str(b_target))[0] == "UNKNOWN_STORAGE_TARGET"
        assert create(conn, a, target="fast")[0] == "UNKNOWN_STORAGE_TARGET"
        assert create(conn, a, target="no-such")[0] == "UNKNOWN_STORAGE_TARGET"
        for project, target in ((None, "default"), (a_project, str(a_target)), (None, None)):
            outcome, task, _, _ = create(conn, a, project=project, target=target)
            assert outcome == "created"
            with db.owner() as owner:
                assert owner.execute(
                    "SELECT project_id, storage_target_id FROM dlw.tasks WHERE id = %s", (task,)
                ).fetchone() == (a_project, a_target)
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (b,)) == 0


def test_created_task_and_files_carry_the_request(db):
    tid = provision(db, "shape")
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_admin", user="user-42")
        outcome, task, metric, detail = conn.execute(
            CREATE_SQL, (None, "default", "org/m", "v1", 7, Jsonb(FILES), None, None, None)
        ).fetchone()
        conn.commit()
    assert (outcome, metric) == ("created", None)
    with db.owner() as owner:
        project, target, created_at = owner.execute(
            "SELECT project_id, storage_target_id, created_at FROM dlw.tasks WHERE id = %s", (task,)
        ).fetchone()
    assert detail == {
        "project_id": str(project),
        "storage_target_id": str(target),
        "file_count": 2,
        "total_bytes": 100,
        "created_at": detail["created_at"],
    }
    assert datetime.fromisoformat(detail["created_at"]) == created_at
    with db.owner() as owner:
        assert owner.execute(
            "SELECT status, repo_id, revision, priority, file_count, total_bytes, created_by, finished_at"
            " FROM dlw.tasks WHERE id = %s",
            (task,),
        ).fetchone() == ("pending", "org/m", "v1", 7, 2, 100, "user-42", None)
        assert owner.execute(
            "SELECT path, size, sha256, status, priority FROM dlw.task_files WHERE task_id = %s ORDER BY path",
            (task,),
        ).fetchall() == [
            ("config.json", 10, None, "pending", 7),
            ("model.safetensors", 90, "ab" * 32, "pending", 7),
        ]
        assert owner.execute(
            "SELECT actor, detail ->> 'total_bytes' FROM dlw.audit_log WHERE action = 'task.created' AND target = %s",
            (str(task),),
        ).fetchone() == ("user-42", "100")


def test_a_duplicate_path_fails_whole_and_creates_nothing(db):
    tid = provision(db, "dup")
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.UniqueViolation):
        create(conn, tid, files=[{"path": "a", "size": 1}, {"path": "a", "size": 2}])
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0


def test_a_viewer_is_refused_by_row_level_security(db):
    tid = provision(db, "viewer")
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        create(conn, tid, role="tenant_viewer")
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0
    assert audit_count(db, tid, "quota.exceeded") == 0


def test_without_context_create_is_refused(db):
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(CREATE_SQL, (None, None, "r", "main", 0, Jsonb([]), None, None, None))


def test_an_inactive_tenant_creates_nothing(db):
    tid = provision(db, "sleepy")
    with db.owner() as owner:
        owner.execute("UPDATE dlw.tenants SET active = false WHERE tenant_id = %s", (tid,))
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "TENANT_INACTIVE"
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0


def test_admission_refuses_to_run_above_read_committed(db):
    tid = provision(db, "isolation")
    with psycopg.connect(db.app_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(errors.InvalidTransactionState):
            create(conn, tid)


def test_quota_current_reports_limits_and_exact_usage(db):
    tid = provision(db, "gauge", concurrent=4, bytes_month=5000)
    with psycopg.connect(db.app_url) as conn:
        for _ in range(3):
            create(conn, tid)
        as_tenant(conn, tid, "tenant_viewer", user="user-1")
        row = conn.execute("SELECT * FROM dlw.quota_current()").fetchone()
        names = [d.name for d in conn.execute("SELECT * FROM dlw.quota_current()").description]
    got = dict(zip(names, row, strict=True))
    assert got["tenant_id"] == tid
    assert (got["bytes_used_month"], got["bytes_quota_month"]) == (0, 5000)
    assert (got["storage_gb_used"], got["storage_gb_quota"]) == (0, 100)
    assert (got["concurrent_tasks"], got["concurrent_quota"]) == (3, 4)
    assert set(names) >= {"period", "snapshot_refreshed_at", "snapshot_age_seconds"}
    with psycopg.connect(db.app_url) as conn:
        assert conn.execute("SELECT * FROM dlw.quota_current()").fetchall() == []  # no context, no row


def test_functions_are_commented_invoker_rights_and_executable_by_the_app_only(db):
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT p.oid::regprocedure::text, p.prosecdef, obj_description(p.oid, 'pg_proc') IS NOT NULL,
                   has_function_privilege('dlw_app', p.oid, 'EXECUTE'),
                   has_function_privilege('dlw_reporting', p.oid, 'EXECUTE'),
                   p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                               WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'dlw' AND p.proname IN ('create_task', 'cancel_task', 'quota_current',
                  'month_start', 'bytes_used_month', 'task_status_guard', 'task_file_status_guard',
                  'initial_status_guard')""").fetchall()
    assert len(rows) == 8
    for name, definer, commented, app_exec, reporting_exec, public_exec in rows:
        assert not definer, name
        assert commented, name
        assert not reporting_exec, name
        assert not public_exec, name
        if "guard" not in name:
            assert app_exec, name
    assert check_catalog(db.owner_url) == []


def test_refusals_for_ever_new_repo_ids_still_leave_one_audit_row(db):
    """A caller over quota who varies repo_id on every request gets no row per request: quota
    refusals repeat per (actor, metric, minute), the repo only in the first one's detail."""
    tid = provision(db, "repo-flood", concurrent=1)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "created"
        outcomes = {create(conn, tid, repo=f"org/flood-{i}")[0] for i in range(50)}
    assert outcomes == {"QUOTA_EXCEEDED"}
    rows = scalar(db, "SELECT count(*) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'quota.exceeded'", (tid,))
    assert (rows, audit_count(db, tid, "quota.exceeded")) in ((1, 50), (2, 50))  # 2: the flood crossed a minute
