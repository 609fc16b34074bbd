"""The usage fold (dlw.refresh_quota_snapshots) and its drift check (dlw.quota_drift): incremental,
exact under out-of-order commits, never two runs at once, and free of deadlocks with admission."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

REFRESH = (
    "SELECT ran, events, tenants, periods, folded_from::text, folded_below::text FROM dlw.refresh_quota_snapshots()"
)


@pytest.fixture(scope="module")
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    with db.owner() as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        yield conn


def provision(db: MigratedDb, slug: str, bytes_month: int = 0) -> int:
    """A tenant limited in bytes only: no concurrency or rate limit gets in the way of a fold."""
    tid = tenant(db, slug, concurrent=0, bytes_month=bytes_month, storage_gb=0)
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 0 WHERE tenant_id = %s", (tid,))
    return tid


def add_usage(conn: psycopg.Connection, tenant: int, amount: int, at: str = "now()") -> None:
    conn.execute(
        "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, occurred_at)"
        f" VALUES (%s, 'bytes_month', %s, %s, {at})",
        (tenant, amount, f"test:{uuid.uuid4()}"),
    )


def refresh(db: MigratedDb, *, as_app: bool = True) -> dict[str, Any]:
    """A refresh as the API leader runs it (dlw_app), in its own transaction."""
    with psycopg.connect(db.app_url if as_app else db.owner_url, row_factory=dict_row) as conn:
        return conn.execute(REFRESH).fetchone()


def snapshot(owner: psycopg.Connection, tenant: int, period: str = "dlw.month_start(now())") -> int | None:
    row = owner.execute(
        f"SELECT amount FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = {period} AND metric = 'bytes_month'",
        (tenant,),
    ).fetchone()
    return None if row is None else int(row["amount"])


def used(db: MigratedDb, tenant: int) -> int:
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenant, "tenant_viewer", user="viewer")
        return int(conn.execute("SELECT bytes_used_month FROM dlw.quota_current()").fetchone()[0])


def drift(owner: psycopg.Connection) -> list[dict[str, Any]]:
    return owner.execute("SELECT * FROM dlw.quota_drift()").fetchall()


def test_a_refresh_folds_new_events_once_into_their_tenant_and_utc_month(db, owner):
    a, b = provision(db, "fold-a"), provision(db, "fold-b")
    refresh(db)  # start from a clean cursor
    add_usage(owner, a, 100)
    add_usage(owner, a, 20)
    add_usage(owner, b, 7)
    # The last microsecond of the previous UTC month counts there.
    add_usage(owner, b, 5, "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'")
    assert used(db, a) == 120 and used(db, b) == 7

    result = refresh(db)
    assert result["ran"] and (result["events"], result["tenants"], result["periods"]) == (4, 2, 3)
    assert snapshot(owner, a) == 120 and snapshot(owner, b) == 7
    assert snapshot(owner, b, "(dlw.month_start(now()) - interval '1 month')::date") == 5
    assert used(db, a) == 120 and used(db, b) == 7  # exact, folded or not
    state = owner.execute("SELECT folded_below::text AS c, refreshed_at FROM dlw.snapshot_state").fetchone()
    assert state["c"] == result["folded_below"] and state["refreshed_at"] is not None

    again = refresh(db)
    assert again["ran"] and again["events"] == 0 and again["folded_from"] == result["folded_below"]
    assert snapshot(owner, a) == 120
    assert drift(owner) == []


def test_out_of_order_commits_are_folded_exactly(db, owner):
    """An early transaction holds its usage row open while a later one commits and a refresh
    runs: the cursor stops below the open transaction, and the next refresh after it commits
    counts both rows exactly once. A watermark on time (or a bigserial) would have skipped it."""
    tenant = provision(db, "out-of-order")
    refresh(db)
    with psycopg.connect(db.owner_url) as early, psycopg.connect(db.owner_url) as late:
        early_xid = int(early.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        add_usage(early, tenant, 1000)  # inserted first, committed last
        early_at = early.execute(
            "SELECT max(occurred_at) FROM dlw.usage_records WHERE tenant_id = %s", (tenant,)
        ).fetchone()[0]
        add_usage(late, tenant, 10)
        late.commit()

        first = refresh(db)
        assert first["ran"] and int(first["folded_below"]) <= early_xid
        assert snapshot(owner, tenant) in (None, 0)  # the late row waits behind the open one
        assert used(db, tenant) == 10  # and admission still counts it, unfolded
        late_at = owner.execute("SELECT max(occurred_at) AS t FROM dlw.usage_records WHERE tenant_id = %s", (tenant,))
        # A time watermark taken now would already be past the early row's time.
        assert early_at < late_at.fetchone()["t"]
        early.commit()

    second = refresh(db)
    assert second["ran"] and int(second["folded_below"]) > early_xid and second["events"] >= 2
    assert snapshot(owner, tenant) == 1010
    assert used(db, tenant) == 1010
    assert drift(owner) == []
    refresh(db)
    assert snapshot(owner, tenant) == 1010


def test_a_rolled_back_event_is_never_counted(db, owner):
    tenant = provision(db, "rolled-back")
    with psycopg.connect(db.owner_url) as conn:
        add_usage(conn, tenant, 500)
        conn.rollback()
    add_usage(owner, tenant, 1)
    refresh(db)
    assert snapshot(owner, tenant) == 1 and drift(owner) == []


def test_two_runs_never_overlap(db, owner):
    tenant = provision(db, "overlap")
    add_usage(owner, tenant, 3)
    with psycopg.connect(db.owner_url, row_factory=dict_row) as holder:
        assert holder.execute(REFRESH).fetchone()["ran"]  # uncommitted: still holds the run lock
        started = time.monotonic()
        skipped = refresh(db)
        assert time.monotonic() - started < 1
        assert skipped["ran"] is False and skipped["events"] == 0
        holder.commit()
    assert snapshot(owner, tenant) == 3
    assert refresh(db)["ran"]


def test_the_drift_check_reports_a_snapshot_that_differs_from_the_log(db, owner):
    tenant = provision(db, "drift")
    add_usage(owner, tenant, 40)
    refresh(db)
    assert drift(owner) == []
    owner.execute(
        "UPDATE dlw.quota_snapshots SET amount = amount + 2 WHERE tenant_id = %s AND period = dlw.month_start(now())",
        (tenant,),
    )
    # A snapshot row whose events are all missing from the log is reported too.
    owner.execute(
        "INSERT INTO dlw.quota_snapshots (tenant_id, period, metric, amount)"
        " VALUES (%s, '2001-01-01', 'bytes_month', 9)",
        (tenant,),
    )
    period = owner.execute("SELECT dlw.month_start(now()) AS p").fetchone()["p"]
    assert drift(owner) == [
        {
            "tenant_id": tenant,
            "period": date(2001, 1, 1),
            "metric": "bytes_month",
            "snapshot_amount": 9,
            "log_amount": 0,
            "difference": 9,
        },
        {
            "tenant_id": tenant,
            "period": period,
            "metric": "bytes_month",
            "snapshot_amount": 42,
            "log_amount": 40,
            "difference": 2,
        },
    ]
    owner.execute("DELETE FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = '2001-01-01'", (tenant,))
    owner.execute(
        "UPDATE dlw.quota_snapshots SET amount = amount - 2 WHERE tenant_id = %s AND period = dlw.month_start(now())",
        (tenant,),
    )
    assert drift(owner) == []


def test_privileges_of_the_fold(db):
    with db.owner() as conn:
        check = "SELECT has_function_privilege(%s, %s, 'EXECUTE')"
        assert conn.execute(check, ("dlw_app", "dlw.refresh_quota_snapshots()")).fetchone()[0]
        assert not conn.execute(check, ("dlw_reporting", "dlw.refresh_quota_snapshots()")).fetchone()[0]
        assert not conn.execute(check, ("dlw_app", "dlw.quota_drift()")).fetchone()[0]
        # DBAs go through the audited wrappers, not these.
        assert not conn.execute(check, ("dlw_admin", "dlw.quota_drift()")).fetchone()[0]
        assert conn.execute(check, ("dlw_admin", "dlw_admin.quota_drift()")).fetchone()[0]
        assert conn.execute(check, ("dlw_admin", "dlw_admin.refresh_quota_snapshots()")).fetchone()[0]
        # Usage stays append-only for every application role, the fold's owner included.
        for role in ("dlw_app", "dlw_system", "dlw_reporting"):
            for action in ("UPDATE", "DELETE"):
                assert not conn.execute(
                    "SELECT has_table_privilege(%s, 'dlw.usage_records', %s)", (role, action)
                ).fetchone()[0]


def test_a_refresh_at_repeatable_read_is_exact_too(db, owner):
    tenant = provision(db, "repeatable-read")
    add_usage(owner, tenant, 6)
    with psycopg.connect(db.app_url, row_factory=dict_row) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert conn.execute(REFRESH).fetchone()["ran"]
    assert snapshot(owner, tenant) == 6 and drift(owner) == []


def create_task(conn: psycopg.Connection, tenant: int, size: int) -> str:
    as_tenant(conn, tenant, "tenant_operator", user="op")
    return str(
        conn.execute(
            "SELECT outcome FROM dlw.create_task(NULL, 'default', 'org/m', 'main', 0, %s, NULL, NULL, 5000)",
            (Jsonb([{"path": f"f-{uuid.uuid4().hex}", "size": size}]),),
        ).fetchone()[0]
    )


def test_refresh_and_admission_wait_for_each_other_without_deadlock(db, owner):
    """The two writers of quota_snapshots: admission inserts or locks its tenant's two rows, the
    fold updates or inserts every row it folds, both in ascending order, one row after the other
    (tests/sql/test_snapshot_lock_order.py). Either may wait for the other, never both."""
    tenants = [provision(db, f"mix-{i}", bytes_month=1 << 40) for i in range(4)]
    # Admission holds its (brand new) rows while the fold needs one of them.
    fresh = provision(db, "mix-fresh", bytes_month=1 << 40)
    add_usage(owner, fresh, 5)  # committed before the admission starts: below the fold's horizon
    with psycopg.connect(db.app_url) as admission:
        assert create_task(admission, fresh, 1) == "created"
        folded: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: folded.append(refresh(db)))
        runner.start()
        time.sleep(0.3)
        assert runner.is_alive()  # waits for the admission's rows
        admission.commit()
        runner.join(10)
    assert folded and folded[0]["ran"] and snapshot(owner, fresh) == 5

    # The fold holds its locks while an admission of the same tenant waits.
    add_usage(owner, tenants[0], 8)
    with psycopg.connect(db.owner_url, row_factory=dict_row) as fold:
        assert fold.execute(REFRESH).fetchone()["ran"]
        created: list[str] = []
        with psycopg.connect(db.app_url) as admission:
            waiter = threading.Thread(target=lambda: created.append(create_task(admission, tenants[0], 1)))
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive()
            fold.commit()
            waiter.join(10)
            admission.commit()
    assert created == ["created"]

    # And at random, for a while: many admissions across tenants against back-to-back folds.
    errors: list[BaseException] = []
    stop = time.monotonic() + 3

    def admit(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db.app_url) as conn:
                while time.monotonic() < stop:
                    assert create_task(conn, rng.choice(tenants), 1) == "created"
                    with psycopg.connect(db.owner_url) as writer:
                        add_usage(writer, rng.choice(tenants), rng.randint(1, 9))
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    def fold_loop() -> None:
        try:
            while time.monotonic() < stop:
                refresh(db)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(6)] + [threading.Thread(target=fold_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    refresh(db)
    assert drift(owner) == []
    for tid in tenants:
        log = owner.execute(
            "SELECT coalesce(sum(amount), 0) AS s FROM dlw.usage_records WHERE tenant_id = %s"
            " AND occurred_at >= dlw.month_start(now())::timestamp AT TIME ZONE 'UTC'",
            (tid,),
        ).fetchone()["s"]
        assert used(db, tid) == log == snapshot(owner, tid)


def test_concurrent_inserts_and_refreshes_fold_every_event_once_in_its_month(db, owner):
    """Writers commit usage (this month and the last microsecond of the previous one) in
    transactions of random length while refreshes run back to back, some of them from a second
    caller that finds the run lock taken: at the end every event is counted exactly once, in the
    snapshot of its own UTC month, and the usage read never went down on the way."""
    tenants = [provision(db, f"race-{i}") for i in range(3)]
    previous = "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'"
    errors: list[BaseException] = []
    seen: dict[int, list[int]] = {t: [] for t in tenants}
    stop = time.monotonic() + 3

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db.owner_url) as conn:
                while time.monotonic() < stop:
                    for _ in range(rng.randint(1, 4)):
                        add_usage(
                            conn, rng.choice(tenants), rng.randint(1, 9), previous if rng.random() < 0.3 else "now()"
                        )
                    time.sleep(rng.random() / 50)  # held open across a refresh now and then
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    def fold() -> None:
        try:
            while time.monotonic() < stop:
                refresh(db)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while time.monotonic() < stop:
                for t in tenants:
                    seen[t].append(used(db, t))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=fold) for _ in range(2)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    refresh(db)
    assert drift(owner) == []
    for tid in tenants:
        assert seen[tid] == sorted(seen[tid]), "a usage read went down while folds committed"
        for period, start, end in (
            ("dlw.month_start(now())", "dlw.month_start(now())", "dlw.month_start(now()) + interval '1 month'"),
            (
                "(dlw.month_start(now()) - interval '1 month')::date",
                "dlw.month_start(now()) - interval '1 month'",
                "dlw.month_start(now())",
            ),
        ):
            log = owner.execute(
                "SELECT coalesce(sum(amount), 0) AS s FROM dlw.usage_records WHERE tenant_id = %s"
                f" AND occurred_at >= ({start})::timestamp AT TIME ZONE 'UTC'"
                f" AND occurred_at < ({end})::timestamp AT TIME ZONE 'UTC'",
                (tid,),
            ).fetchone()["s"]
            assert log > 0 and snapshot(owner, tid, period) == log, (tid, period)
        assert used(db, tid) == snapshot(owner, tid)
