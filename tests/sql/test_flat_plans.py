"""The plans that keep admission and the claim flat (issue 16), pinned as the API runs them: as
dlw_app, through the real functions. Statements inside a function have no EXPLAIN, so each test
reads what the call itself read, from the transaction's own statistics (pg_stat_get_xact_*:
scans and rows returned per table and index, this backend, this transaction only) and fails if a
plan regresses to reading history, tenants or leases in flight."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, as_tenant, tenant

READ = """
SELECT c.relname, pg_stat_get_xact_numscans(c.oid) AS scans, pg_stat_get_xact_tuples_returned(c.oid) AS rows_read
  FROM pg_class c
 WHERE c.relnamespace = 'dlw'::regnamespace AND c.relkind IN ('r', 'i')"""
FOLDED, UNFOLDED = 3000, 3


def reads(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    """(scans, rows read) of every dlw table and index in the current transaction so far; for a
    table, scans are sequential scans."""
    return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(READ)}


def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {k: (v[0] - before[k][0], v[1] - before[k][1]) for k, v in after.items() if v != before[k]}


@pytest.fixture(scope="module")
def usage_tenant(db: MigratedDb) -> int:
    """A tenant with FOLDED usage rows this month already folded and UNFOLDED not yet; other
    tenants' rows around it (so an index is worth using), statistics fresh."""
    tid = tenant(db, "flat-usage", concurrent=0, bytes_month=10**15, storage_gb=0)
    other = tenant(db, "flat-other", **UNLIMITED)
    with db.owner() as conn:
        for t, n in ((tid, FOLDED), (other, 20_000)):
            conn.execute(
                "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
                " SELECT %s, 'bytes_month', 1, 'f:' || g FROM generate_series(1, %s) g",
                (t, n),
            )
        conn.execute("SELECT dlw.refresh_quota_snapshots()")
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
            " SELECT %s, 'bytes_month', 1, 'u:' || g FROM generate_series(1, %s) g",
            (tid, UNFOLDED),
        )
        conn.execute("ANALYZE dlw.usage_records")
    return tid


def test_the_usage_read_reads_only_unfolded_rows_through_the_tenant_xid_index(db, usage_tenant):
    """dlw.bytes_used_month (admission and /quota/current) as dlw_app: the fold cursor is an index
    condition on usage_records_tenant_xid, so the folded history this month is never read, in
    the custom plans and in the generic plan PL/pgSQL settles on after five calls."""
    with psycopg.connect(db.app_url) as conn:
        for call in range(8):
            with conn.transaction():
                as_tenant(conn, usage_tenant, "tenant_operator")
                before = reads(conn)
                used = conn.execute(
                    "SELECT dlw.bytes_used_month(%s, dlw.month_start(now()))", (usage_tenant,)
                ).fetchone()
                read = delta(before, reads(conn))
            assert used == (FOLDED + UNFOLDED,)
            assert read.get("usage_records_tenant_xid", (0, 0))[0] >= 1, (call, read)
            assert read["usage_records_tenant_xid"][1] <= UNFOLDED, (call, read)
            assert read.get("usage_records", (0, 0))[0] == 0, f"sequential scan of usage_records: {read}"
            rows_read = sum(r for name, (_, r) in read.items() if name.startswith("usage_records"))
            assert rows_read <= 2 * UNFOLDED, (call, read)


def test_admission_reads_only_unfolded_usage(db, usage_tenant):
    """dlw.create_task with a byte quota (which reads the usage) reads no folded usage row."""
    with psycopg.connect(db.app_url) as conn:
        for call in range(7):
            with conn.transaction(force_rollback=True):
                as_tenant(conn, usage_tenant, "tenant_operator")
                before = reads(conn)
                (outcome,) = conn.execute(
                    "SELECT outcome FROM dlw.create_task(NULL, 'default', 'org/m', 'main', 0, %s)",
                    (Jsonb([{"path": "a", "size": 1}]),),
                ).fetchone()
                read = delta(before, reads(conn))
            assert outcome == "created"
            rows_read = sum(r for name, (_, r) in read.items() if name.startswith("usage_records"))
            assert rows_read <= 2 * UNFOLDED and read.get("usage_records", (0, 0))[0] == 0, (call, read)


TENANTS, PENDING_EACH, IN_FLIGHT_EACH = 30, 5, 20


@pytest.fixture(scope="module")
def busy_queue(db: MigratedDb) -> list[int]:
    """TENANTS tenants with pending files and live leases in flight (none expired), written with
    the triggers on (so the queue summary is kept by them, not rebuilt)."""
    ids = [tenant(db, f"flat-q{i}", **UNLIMITED) for i in range(TENANTS)]
    with db.owner() as conn:
        for tid in ids:
            conn.execute(
                "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
                " SELECT p.tenant_id, p.id, s.id, 'org/flat', 'main' FROM dlw.projects p"
                " JOIN dlw.storage_targets s ON s.tenant_id = p.tenant_id AND s.name = 'default'"
                " WHERE p.tenant_id = %s AND p.is_default",
                (tid,),
            )
            conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE tenant_id = %s", (tid,))
            conn.execute(
                "INSERT INTO dlw.task_files (tenant_id, task_id, path, size)"
                " SELECT x.tenant_id, x.id, 'live-' || g, 1 FROM dlw.tasks x, generate_series(1, %s) g"
                " WHERE x.tenant_id = %s",
                (IN_FLIGHT_EACH, tid),
            )
            conn.execute(
                "UPDATE dlw.task_files SET status = 'assigned', attempts = 1, assignment_token = gen_random_uuid(),"
                " lease_seconds = 3600, lease_expires_at = now() + interval '1 hour' WHERE tenant_id = %s",
                (tid,),
            )
            conn.execute(
                "INSERT INTO dlw.task_files (tenant_id, task_id, path, size)"
                " SELECT x.tenant_id, x.id, 'queued-' || g, 1 FROM dlw.tasks x, generate_series(1, %s) g"
                " WHERE x.tenant_id = %s",
                (PENDING_EACH, tid),
            )
        # The per-minute refresh folds the queue changes too; then the tables as autovacuum keeps
        # them (the dead index entries of the pending -> assigned updates gone, statistics fresh).
        conn.execute("SELECT dlw.refresh_quota_snapshots()")
        conn.execute("VACUUM ANALYZE dlw.task_files")
        conn.execute("VACUUM ANALYZE dlw.executor_queue")
    return ids


@pytest.mark.parametrize("max_files", [1, 10])
def test_the_claim_reads_what_it_returns_not_the_tenants_or_the_leases(db, busy_queue, max_files):
    """A system-wide claim: the sweep reads the expiry index (nothing expired: no rows), the
    fairness step reads at most max_files summary entries of executor_queue_rank, and no
    lease in flight or other tenant's queue is counted (no sequential scan of task_files, nothing
    read from task_files_in_flight)."""
    with psycopg.connect(db.app_url) as conn:
        for _call in range(7):
            with conn.transaction(force_rollback=True):
                as_tenant(conn, 0, "executor", user="flat")
                before = reads(conn)
                got = conn.execute("SELECT * FROM dlw.executor_claim(%s, 60)", (max_files,)).fetchall()
                read = delta(before, reads(conn))
            assert len(got) == max_files
            assert read.get("task_files", (0, 0))[0] == 0, f"sequential scan of task_files: {read}"
            assert read.get("task_files_lease_expiry", (0, 0))[0] >= 1, read
            assert read["task_files_lease_expiry"][1] == 0, read
            assert read.get("task_files_in_flight", (0, 0))[1] == 0, read
            assert read.get("executor_queue_rank", (0, 0))[0] >= 1, read
            assert read["executor_queue_rank"][1] <= max_files + 1, read
            assert read.get("task_files_queue", (0, 0))[1] <= 2 * max_files + 2, read
