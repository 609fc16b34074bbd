"""The lock order between the usage fold and task admission, the two writers of quota_snapshots,
at a month rollover: both take a tenant's rows in ascending period order, one row after the other
in one statement, so neither can hold this month's row while it waits for last month's."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.sql.test_snapshots import REFRESH, add_usage, create_task, owner, provision, refresh, snapshot
from tests.support.database import MigratedDb

__all__ = ["owner"]  # the module's owner connection fixture, shared with test_snapshots

PREVIOUS = "(dlw.month_start(now()) - interval '1 month')::date"
LAST_MICROSECOND = "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'"


def wait_for_lock(owner: psycopg.Connection, pid: int) -> None:
    """Until backend `pid` waits for a lock (a row's transaction or a tuple lock)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = owner.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row["wait_event_type"] == "Lock":
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited for a lock")


def test_the_fold_and_admission_never_deadlock_when_this_months_row_is_new(db: MigratedDb, owner: Any) -> None:
    """Last month's row exists, this month's does not; the fold has events of both months. A third
    transaction holds last month's row, the fold queues behind it, then admission. When the holder
    ends, the fold takes last month's row and inserts this month's. Admission inserting this
    month's row before it has locked last month's (an insert, then a lock statement) would make
    the fold wait for admission while admission waits for the fold: a deadlock, which PostgreSQL
    breaks by failing one of them after deadlock_timeout."""
    tenant = provision(db, "rollover", bytes_month=1 << 40)
    refresh(db)
    owner.execute(
        "INSERT INTO dlw.quota_snapshots (tenant_id, period, metric, amount)"
        f" VALUES (%s, {PREVIOUS}, 'bytes_month', 0)",
        (tenant,),
    )
    add_usage(owner, tenant, 3, LAST_MICROSECOND)
    add_usage(owner, tenant, 4)
    outcome: dict[str, Any] = {}

    def run(key: str, conn: psycopg.Connection, call: Any) -> None:
        try:
            outcome[key] = call(conn)
            conn.commit()
        except psycopg.Error as exc:
            outcome[key] = exc

    with (
        psycopg.connect(db.owner_url, row_factory=dict_row) as holder,
        psycopg.connect(db.owner_url, row_factory=dict_row) as fold,
        psycopg.connect(db.app_url) as admission,
    ):
        holder.execute(
            f"SELECT 1 FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = {PREVIOUS} FOR UPDATE", (tenant,)
        )
        threads = [
            threading.Thread(target=run, args=("fold", fold, lambda c: c.execute(REFRESH).fetchone())),
            threading.Thread(target=run, args=("admission", admission, lambda c: create_task(c, tenant, 1))),
        ]
        threads[0].start()
        wait_for_lock(owner, fold.info.backend_pid)
        threads[1].start()
        wait_for_lock(owner, admission.info.backend_pid)
        holder.commit()
        for t in threads:
            t.join(30)
    assert outcome["admission"] == "created", outcome
    assert outcome["fold"]["ran"] and outcome["fold"]["events"] == 2, outcome
    assert snapshot(owner, tenant, PREVIOUS) == 3
    assert snapshot(owner, tenant) == 4
