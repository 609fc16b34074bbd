"""Quota admission in SQL: bytes per UTC month, used (folded and unfolded) plus reserved by live
tasks plus requested, and the month no session setting can move (tests/support/admission.py).
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import psycopg

from tests.support.admission import (
    add_usage,
    audit_count,
    concurrently,
    create,
    max_parallel,
    one_file,
    provision,
    scalar,
)
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant


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
