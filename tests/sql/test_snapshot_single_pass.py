"""The fold's single pass (sql/50_snapshots.sql, step 3a): a run whose totals are all for one month
and one metric adds them to the existing quota_snapshots rows in one UPDATE over the primary key
(dlw.fold_add_to_existing_rows), in ascending tenant order; a missing row rolls that pass back and
the ordered MERGE does the whole write; a run over two months takes the MERGE at once. Each test
reads which path ran from the transaction's own statistics (function calls, index scans)."""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.sql.test_snapshot_lock_order import PREVIOUS, wait_for_lock
from tests.sql.test_snapshots import REFRESH, add_usage, drift, owner, provision, refresh, snapshot
from tests.support.database import MigratedDb

__all__ = ["owner"]  # the module's owner connection fixture, shared with test_snapshots

# How the run wrote: calls of the single pass, and reads of the new events (the MERGE path reads
# them a second time, sorted by tenant, month and metric).
PATHS = """
SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions
         WHERE schemaname = 'dlw' AND funcname = 'fold_add_to_existing_rows') AS single_pass,
       pg_stat_get_xact_numscans('dlw.usage_records_xid'::regclass) AS event_reads"""


def use_settings_of(conn: psycopg.Connection, function: str) -> str:
    """The function's own settings (its SET clauses) for the rest of this transaction, as it runs
    its statements; returns its source."""
    src, config = conn.execute(
        "SELECT prosrc, proconfig FROM pg_proc WHERE oid = %s::regprocedure", (function,)
    ).fetchone()
    for setting in config:
        name, value = setting.split("=", 1)
        conn.execute("SELECT set_config(%s, %s, true)", (name, value))
    return str(src)


def fold_counting(conn: psycopg.Connection) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fold in its own transaction on a superuser connection, with what it ran."""
    with conn.transaction():
        conn.execute("SET LOCAL track_functions = 'pl'")
        result = conn.execute(REFRESH).fetchone()
        paths = conn.execute(PATHS).fetchone()
    return result, paths


def tenants_with_rows(db: MigratedDb, owner: Any, slugs: list[str]) -> list[int]:
    """Tenants whose row for this month exists (a first fold created it), nothing left unfolded."""
    ids = [provision(db, s) for s in slugs]
    for t in ids:
        add_usage(owner, t, 1)
    refresh(db)
    assert all(snapshot(owner, t) == 1 for t in ids)
    return ids


def test_a_one_month_fold_over_existing_rows_is_one_update(db, owner):
    a, b, c = tenants_with_rows(db, owner, ["pass-a", "pass-b", "pass-c"])
    for t, amounts in ((a, (10, 5)), (b, (7,)), (c, (1, 2, 3))):
        for n in amounts:
            add_usage(owner, t, n)
    with psycopg.connect(db.owner_url, row_factory=dict_row) as conn:
        result, paths = fold_counting(conn)
    assert (result["events"], result["tenants"], result["periods"]) == (6, 3, 3)
    assert paths == {"single_pass": 1, "event_reads": 1}
    assert [snapshot(owner, t) for t in (a, b, c)] == [16, 8, 7]
    assert drift(owner) == []


def test_a_missing_row_rolls_the_single_pass_back_and_the_merge_writes_everything(db, owner):
    a, b = tenants_with_rows(db, owner, ["miss-a", "miss-b"])
    new = provision(db, "miss-new")  # no row this month yet
    for t, n in ((a, 4), (new, 9), (b, 6)):
        add_usage(owner, t, n)
    with psycopg.connect(db.owner_url, row_factory=dict_row) as conn:
        result, paths = fold_counting(conn)
    assert (result["events"], result["tenants"], result["periods"]) == (3, 3, 3)
    # The pass ran, found 2 rows of 3, was rolled back; the MERGE read the totals again.
    assert paths == {"single_pass": 1, "event_reads": 2}
    assert [snapshot(owner, t) for t in (a, new, b)] == [5, 9, 7]  # each total added once
    assert drift(owner) == []


def test_a_fold_over_two_months_takes_the_merge(db, owner):
    (a,) = tenants_with_rows(db, owner, ["two-months"])
    owner.execute(
        "INSERT INTO dlw.quota_snapshots (tenant_id, period, metric, amount)"
        f" VALUES (%s, {PREVIOUS}, 'bytes_month', 0)",
        (a,),
    )
    add_usage(owner, a, 3, "dlw.month_start(now())::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'")
    add_usage(owner, a, 4)
    with psycopg.connect(db.owner_url, row_factory=dict_row) as conn:
        result, paths = fold_counting(conn)
    assert (result["events"], result["tenants"], result["periods"]) == (2, 1, 2)
    assert paths == {"single_pass": 0, "event_reads": 2}
    assert (snapshot(owner, a, PREVIOUS), snapshot(owner, a)) == (3, 5)
    assert drift(owner) == []


def test_the_single_pass_takes_the_rows_in_ascending_tenant_order(db, owner):
    """A third transaction holds the middle tenant's row: the pass waits there holding the first
    tenant's row (updated) and not yet the last's; when the holder ends it finishes, exactly."""
    first, middle, last = tenants_with_rows(db, owner, ["order-1", "order-2", "order-3"])
    # The first tenant's row written again, so it lies after the others in the table: taking the
    # rows in physical order (a sequential or bitmap scan) would not hold it while waiting below.
    owner.execute(
        "WITH gone AS (DELETE FROM dlw.quota_snapshots WHERE tenant_id = %s RETURNING *)"
        " INSERT INTO dlw.quota_snapshots SELECT * FROM gone",
        (first,),
    )
    owner.commit()
    for t in (first, middle, last):
        add_usage(owner, t, 2)
    row = "SELECT 1 FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = dlw.month_start(now()) FOR UPDATE"
    outcome: dict[str, Any] = {}
    with (
        psycopg.connect(db.owner_url, row_factory=dict_row) as holder,
        psycopg.connect(db.owner_url, row_factory=dict_row) as fold,
        psycopg.connect(db.owner_url) as probe,
    ):
        holder.execute(row, (middle,))

        def run() -> None:
            try:
                outcome["fold"] = fold_counting(fold)
            except psycopg.Error as exc:
                outcome["fold"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_for_lock(owner, fold.info.backend_pid)
            for tenant, taken in ((first, True), (last, False)):
                with probe.transaction(force_rollback=True):
                    if taken:
                        with pytest.raises(psycopg.errors.LockNotAvailable):
                            probe.execute(row + " NOWAIT", (tenant,))
                    else:
                        probe.execute(row + " NOWAIT", (tenant,))
        finally:  # the fold finishes whatever the checks found (a failed check must not hang)
            holder.commit()
            thread.join(30)
        assert not thread.is_alive(), "the fold did not finish"
    result, paths = outcome["fold"]
    assert result["periods"] == 3 and paths["single_pass"] == 1, outcome
    assert [snapshot(owner, t) for t in (first, middle, last)] == [3, 3, 3]


def test_the_single_pass_is_one_index_scan_in_key_order_for_any_array(db):
    """The pass's UPDATE, planned with the function's own settings (its SET clauses) as a generic
    plan: an index scan of quota_snapshots_pkey with tenant_id = ANY (...) as its condition (so
    the rows come, and are locked, in key order), never a bitmap or sequential scan (physical
    order), for 3 or 10,000 tenants."""
    with psycopg.connect(db.owner_url) as conn:
        src = use_settings_of(conn, "dlw.fold_add_to_existing_rows(bigint[], bigint[], date, text)")
        update = re.search(r"UPDATE dlw\.quota_snapshots .*?;", src, re.S)
        assert update is not None
        statement = update.group(0).rstrip(";")
        for i, name in enumerate(("p_tenants", "p_amounts", "p_period", "p_metric"), start=1):
            statement = re.sub(rf"\b{name}\b", f"${i}", statement)
        conn.execute(f"PREPARE single_pass(bigint[], bigint[], date, text) AS {statement}")
        for n in (3, 10_000):
            # EXPLAIN EXECUTE takes no $n: the arrays as literals.
            tenants, amounts = ",".join(str(t) for t in range(1, n + 1)), ",".join(["1"] * n)
            args = f"'{{{tenants}}}', '{{{amounts}}}', now()::date, 'bytes_month'"
            explain = f"EXPLAIN (COSTS OFF) EXECUTE single_pass({args})"
            plan = "\n".join(r[0] for r in conn.execute(explain))
            assert "Index Scan using quota_snapshots_pkey on quota_snapshots" in plan, plan
            assert re.search(r"Index Cond: \(\(tenant_id = ANY \(\$1\)\)", plan), plan
            assert not re.search(r"Bitmap|Seq Scan|Sort", plan), plan
        conn.rollback()


def test_the_totals_are_grouped_by_one_sort_in_tenant_order(db):
    """The fold's totals (step 2), planned with dlw.refresh_quota_snapshots' own settings over
    20,000 new events (analyzed, so that a planner free to choose would hash them): the events
    sorted once and grouped in that order; the tenant-ordered arrays need no second sort and no
    hash table is built per tenant."""
    tenant = provision(db, "totals-plan")
    with psycopg.connect(db.owner_url) as conn:
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
            " SELECT %s, 'bytes_month', 1, 'plan:' || g FROM generate_series(1, 20000) g",
            (tenant,),
        )
        conn.execute("ANALYZE dlw.usage_records")  # rolled back with the rows
        use_settings_of(conn, "dlw.refresh_quota_snapshots()")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN (COSTS OFF) SELECT array_agg(d.t ORDER BY d.t), array_agg(d.a ORDER BY d.t), count(*)"
                " FROM dlw.fold_totals('0'::xid8, '18446744073709551615'::xid8) d"
            )
        )
        assert "GroupAggregate" in plan and "HashAggregate" not in plan, plan
        assert len(re.findall(r"^\s*(?:->\s+)?(?:Incremental )?Sort$", plan, re.M)) == 1, plan
        conn.rollback()
