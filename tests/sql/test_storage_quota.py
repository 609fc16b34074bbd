"""The storage quota in SQL (issue 15 item 4): admission counts storage used (distinct contents
stored, dlw.storage_used_bytes) + reserved (live files whose content the target does not hold)
+ what the new task's files add, against quota_storage_gb, exactly under concurrency; and the
registry functions behind it (sql/23_stored_blobs.sql), driven as the API's and the executors'
roles."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import psycopg

from app.domain import STORAGE_GB_BYTES
from tests.support.admission import concurrently, create, max_parallel, scalar
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

GB = STORAGE_GB_BYTES


def sha(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def provision(db: MigratedDb, slug: str, storage_gb: int) -> int:
    return tenant(db, slug, name=slug.title(), concurrent=0, bytes_month=0, storage_gb=storage_gb)


def quota(conn: psycopg.Connection, tid: int) -> dict[str, Any]:
    as_tenant(conn, tid, "tenant_viewer")
    cur = conn.execute("SELECT * FROM dlw.quota_current()")
    names = [d.name for d in cur.description or []]
    row = cur.fetchone()
    conn.commit()
    assert row is not None
    return dict(zip(names, row, strict=True))


def store(db: MigratedDb, tid: int, content: str, size: int, path: str) -> None:
    """A content stored in the tenant's default target, as an executor's completion registers it."""
    with db.owner() as conn:
        target = conn.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s AND name = 'default'", (tid,))
        conn.execute("SET ROLE dlw_system")
        conn.execute(
            "SELECT dlw.storage_record(%s, %s, %s, %s, %s)", (tid, target.fetchone()[0], sha(content), size, path)
        )


def test_a_storage_burst_admits_exactly_the_quota(db):
    tid = provision(db, "storage-burst", storage_gb=1)
    n = max_parallel(db, 200)
    # Each task 0.1 GB of its own content: exactly 10 fit in 1 GB.
    jobs = [
        (
            lambda c, i=i: create(
                c,
                tid,
                files=[{"path": "w.bin", "size": GB // 10, "sha256": sha(i)}],
                repo=f"o/m{i}",
                lock_timeout_ms=60000,
            )
        )
        for i in range(n)
    ]
    results = concurrently(db, jobs)
    assert not [r for r in results if isinstance(r, Exception)], results[:3]
    assert Counter(r[0] for r in results) == {"created": 10, "QUOTA_EXCEEDED": n - 10}
    refusals = [r for r in results if r[0] == "QUOTA_EXCEEDED"]
    assert {r[2] for r in refusals} == {"storage_gb"}
    assert {
        (r[3]["limit"], r[3]["limit_bytes"], r[3]["current"], r[3]["reserved"], r[3]["requested"]) for r in refusals
    } == {(1, GB, 0, GB, GB // 10)}
    reserved = scalar(db, "SELECT sum(size) FROM dlw.task_files WHERE tenant_id = %s AND status = 'pending'", (tid,))
    assert reserved == GB  # 0 over-admission


def test_stored_contents_count_once_and_do_not_count_again_for_a_task_that_has_them(db):
    tid = provision(db, "storage-dedup", storage_gb=1)
    store(db, tid, "big", GB * 6 // 10, "org/a/main/big.bin")
    with psycopg.connect(db.app_url) as conn:
        got = quota(conn, tid)
        assert (got["storage_bytes_used"], got["storage_gb_used"], got["storage_bytes_reserved"]) == (
            GB * 6 // 10,
            1,
            0,
        )
        # The stored content twice more (two names, one content) plus 0.4 GB new: fits exactly.
        files = [
            {"path": "a.bin", "size": GB * 6 // 10, "sha256": sha("big")},
            {"path": "b.bin", "size": GB * 6 // 10, "sha256": sha("big")},
            {"path": "new.bin", "size": GB * 4 // 10, "sha256": sha("new")},
        ]
        assert create(conn, tid, files=files)[0] == "created"
        got = quota(conn, tid)
        assert (got["storage_bytes_used"], got["storage_bytes_reserved"]) == (GB * 6 // 10, GB * 4 // 10)
        # One byte more of anything new is refused; the stored content alone is still admitted.
        refused = create(conn, tid, files=[{"path": "x", "size": 1}], repo="o/x")
        assert refused[:3] == ("QUOTA_EXCEEDED", None, "storage_gb")
        assert refused[3] == {
            "metric": "storage_gb",
            "limit": 1,
            "limit_bytes": GB,
            "current": GB * 6 // 10,
            "reserved": GB * 4 // 10,
            "requested": 1,
        }
        again = create(conn, tid, files=[{"path": "c.bin", "size": GB * 6 // 10, "sha256": sha("big")}], repo="o/y")
        assert again[0] == "created"
        # The same new content twice in one task counts once.
        with db.owner() as owner:
            owner.execute("UPDATE dlw.tenants SET quota_storage_gb = 2 WHERE tenant_id = %s", (tid,))
        twice = [{"path": p, "size": GB // 2, "sha256": sha("twice")} for p in ("p.bin", "q.bin")]
        assert create(conn, tid, files=twice, repo="o/z")[0] == "created"
        assert quota(conn, tid)["storage_bytes_reserved"] == GB * 4 // 10 + GB // 2  # "twice" once


def test_unlimited_storage_admits_anything_and_quota_current_still_counts(db):
    tid = provision(db, "storage-unlimited", storage_gb=0)
    store(db, tid, "one", 123, "o/m/main/one")
    store(db, tid, "one", 123, "o/m/main/one-again")  # the same content: counted once
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid, files=[{"path": "huge", "size": 1 << 50}])[0] == "created"
        got = quota(conn, tid)
    assert (got["storage_bytes_used"], got["storage_gb_used"], got["storage_gb_quota"]) == (123, 1, 0)


def test_another_tenants_stored_contents_neither_count_nor_dedup(db):
    mine = provision(db, "storage-iso-mine", storage_gb=1)
    theirs = provision(db, "storage-iso-theirs", storage_gb=1)
    store(db, theirs, "shared", GB * 9 // 10, "o/m/main/shared")
    with psycopg.connect(db.app_url) as conn:
        assert quota(conn, mine)["storage_bytes_used"] == 0
        # Their content is no dedup source for me: my task of the same sha256 needs its own storage.
        assert create(conn, mine, files=[{"path": "s", "size": GB * 9 // 10, "sha256": sha("shared")}])[0] == "created"
        assert quota(conn, mine)["storage_bytes_reserved"] == GB * 9 // 10
        as_tenant(conn, mine, "tenant_admin")
        assert conn.execute("SELECT count(*) FROM dlw.stored_blobs").fetchone() == (0,)
        assert conn.execute("SELECT dlw.storage_used_bytes(%s)", (theirs,)).fetchone() == (0,)
        conn.rollback()
    with psycopg.connect(db.app_url) as conn:
        assert quota(conn, theirs)["storage_bytes_used"] == GB * 9 // 10  # undisturbed


def test_release_drops_unreferenced_contents_and_frees_their_storage(db):
    tid = provision(db, "storage-release", storage_gb=0)
    store(db, tid, "kept", 10, "o/m/main/kept")
    store(db, tid, "gone", 20, "o/m/main/gone")
    with db.owner() as conn:
        target = conn.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (tid,)).fetchone()[0]
        project = conn.execute("SELECT id FROM dlw.projects WHERE tenant_id = %s", (tid,)).fetchone()[0]
        task = conn.execute(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, file_count,"
            " total_bytes) VALUES (%s, %s, %s, 'o/n', 'main', 1, 10) RETURNING id",
            (tid, project, target),
        ).fetchone()[0]
        # A file that uses the kept content (what a completion records; the status is not what counts).
        conn.execute(
            "INSERT INTO dlw.task_files (tenant_id, task_id, path, size, sha256, stored_path, blob_sha256)"
            " VALUES (%s, %s, 'kept', 10, %s, 'o/n/main/kept', %s)",
            (tid, task, sha("kept"), sha("kept")),
        )
        conn.execute("SET ROLE dlw_system")
        released = conn.execute("SELECT * FROM dlw.storage_release(%s, %s)", (tid, target)).fetchall()
        assert released == [(sha("gone"), 20, "o/m/main/gone")]
        # The kept content's copy moved to the file that still uses it.
        assert conn.execute("SELECT sha256, path FROM dlw.stored_blobs WHERE tenant_id = %s", (tid,)).fetchall() == [
            (sha("kept"), "o/n/main/kept")
        ]
        assert conn.execute("SELECT dlw.storage_used_bytes(%s)", (tid,)).fetchone() == (10,)


def test_a_retry_is_admitted_against_the_storage_quota_too(db):
    tid = provision(db, "storage-retry", storage_gb=1)
    with psycopg.connect(db.app_url) as conn:
        task = create(conn, tid, files=[{"path": "w", "size": GB * 6 // 10, "sha256": sha("w")}])[1]
    with db.owner() as owner:  # the task failed (as an executor's final failure leaves it)
        owner.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (task,))
        owner.execute("UPDATE dlw.task_files SET status = 'cancelled' WHERE task_id = %s", (task,))
        owner.execute("UPDATE dlw.tasks SET status = 'failed', error = 'x' WHERE id = %s", (task,))
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid, files=[{"path": "v", "size": GB // 2, "sha256": sha("v")}], repo="o/v")[0] == "created"
        as_tenant(conn, tid, "tenant_operator")
        row = conn.execute("SELECT outcome, metric, detail FROM dlw.retry_task(%s, 5000)", (task,)).fetchone()
        conn.commit()
        assert row is not None and row[:2] == ("QUOTA_EXCEEDED", "storage_gb")
        assert (row[2]["reserved"], row[2]["requested"]) == (GB // 2, GB * 6 // 10)
