"""The executor reports in SQL (sql/42_executor_reports.sql) as the API's role: tokens and leases,
heartbeats and progress, completion counting usage once (the declared size, nothing else) and
rolling the task up, sha256 and byte-count mismatches.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from tests.support.executor_sql import (
    SHA,
    Executor,
    backoff_over,
    empty_queue,
    ex,
    file_row,
    make_task,
    owner,
    provision,
    task_status,
    usage,
)
from tests.support.tenants import as_tenant, tenant

__all__ = ["empty_queue", "ex", "owner"]  # shared fixtures (tests/support/executor_sql.py; empty_queue: autouse)


def test_wrong_or_stale_tokens_lose_the_lease_and_change_nothing(db, owner, ex):
    tid = provision(db, "tokens")
    task, (file,) = make_task(db, tid, 1)
    (claimed,) = ex.claim(1)
    token = claimed["assignment_token"]
    before = file_row(owner, file)
    for wrong in (uuid.uuid4(), None):
        assert ex.heartbeat(file, wrong, 5) == "LEASE_LOST"
        assert ex.complete(file, wrong) == ("LEASE_LOST", "running")
        assert ex.fail(file, wrong, retryable=False) == ("LEASE_LOST", "running")
        assert ex.release(file, wrong) == "LEASE_LOST"
    assert file_row(owner, file) == before
    assert ex.heartbeat(uuid.uuid4(), token) == "NOT_FOUND"
    # A token that was replaced (the file was requeued and claimed again) is stale.
    assert ex.fail(file, token, retryable=True) == ("requeued", "running")
    backoff_over(owner, file)
    (again,) = ex.claim(1)
    assert again["assignment_token"] != token and again["attempts"] == 2
    assert ex.complete(file, token) == ("LEASE_LOST", "running")
    assert ex.complete(file, again["assignment_token"]) == ("completed", "succeeded")
    assert usage(owner, task) == [(f"file:{file}", 10)]


def test_heartbeat_marks_running_extends_the_lease_and_records_progress(db, owner, ex):
    tid = provision(db, "heartbeat")
    _, (file,) = make_task(db, tid, 1)
    (claimed,) = ex.claim(1, lease=20)
    owner.execute(
        "UPDATE dlw.task_files SET lease_expires_at = clock_timestamp() + interval '2 s' WHERE id = %s", (file,)
    )
    assert ex.heartbeat(file, claimed["assignment_token"], 4) == "ok"
    row = file_row(owner, file)
    left = (row["lease_expires_at"] - owner.execute("SELECT clock_timestamp() AS t").fetchone()["t"]).total_seconds()
    assert row["status"] == "running" and row["bytes_done"] == 4 and 15 < left <= 20
    assert ex.heartbeat(file, claimed["assignment_token"]) == "ok"
    assert file_row(owner, file)["bytes_done"] == 4  # no progress reported: kept


def test_completion_counts_usage_once_and_rolls_the_task_up(db, owner, ex):
    tid = provision(db, "complete")
    task, files = make_task(db, tid, [{"path": "a", "size": 100, "sha256": SHA}, {"path": "b", "size": 50}])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    # The declared size is counted: it is the only count a completion may report (another one
    # is SIZE_MISMATCH, below). A replay is the same success whatever it reports.
    assert ex.complete(files[0], tokens[files[0]], size=100, sha=SHA.upper()) == ("completed", "running")
    assert ex.complete(files[0], tokens[files[0]], size=100) == ("already_completed", "running")
    assert ex.complete(files[0], tokens[files[0]], size=12345) == ("already_completed", "running")
    assert usage(owner, task) == [(f"file:{files[0]}", 100)]
    assert file_row(owner, files[0])["status"] == "succeeded" and file_row(owner, files[0])["bytes_done"] == 100
    # No sha256 in the manifest: any content is accepted. The last file completes the task.
    assert ex.complete(files[1], tokens[files[1]], size=50, sha="cd" * 32) == ("completed", "succeeded")
    assert ex.complete(files[1], tokens[files[1]], size=50) == ("already_completed", "succeeded")
    assert usage(owner, task) == sorted([(f"file:{files[0]}", 100), (f"file:{files[1]}", 50)])
    row = owner.execute(
        "SELECT u.occurred_at <= now() AS recent, u.xid IS NOT NULL AS has_xid, u.metric, u.file_id"
        " FROM dlw.usage_records u WHERE u.task_id = %s AND u.file_id = %s",
        (task, files[1]),
    ).fetchone()
    assert row == {"recent": True, "has_xid": True, "metric": "bytes_month", "file_id": files[1]}
    audit = owner.execute(
        "SELECT actor, detail FROM dlw.audit_log WHERE action = 'task.succeeded' AND target = %s", (str(task),)
    ).fetchall()
    assert audit == [{"actor": "exec-1", "detail": {"bytes": 150}}]
    assert owner.execute("SELECT finished_at IS NOT NULL AS f FROM dlw.tasks WHERE id = %s", (task,)).fetchone()["f"]


def test_concurrent_completions_of_the_last_files_roll_up_once(db, owner):
    tid = provision(db, "last-two")
    task, files = make_task(db, tid, 2)
    a, b = Executor(db, subject="a"), Executor(db, subject="b")
    try:
        tokens = {r["file_id"]: r["assignment_token"] for r in a.claim(2)}
        a.conn.execute("BEGIN")
        as_tenant(a.conn, 0, "executor", user="a")
        a.conn.execute("SELECT * FROM dlw.executor_complete(%s, %s, 10, %s)", (files[0], tokens[files[0]], SHA))
        result: list[tuple[str, str]] = []
        other = threading.Thread(target=lambda: result.append(b.complete(files[1], tokens[files[1]])))
        other.start()
        time.sleep(0.3)  # b waits for the task row a holds
        assert other.is_alive()
        a.conn.execute("COMMIT")
        other.join(10)
        assert result == [("completed", "succeeded")]
        assert task_status(owner, task) == "succeeded"
        assert owner.execute(
            "SELECT count(*) AS n FROM dlw.audit_log WHERE action = 'task.succeeded' AND target = %s", (str(task),)
        ).fetchone() == {"n": 1}
    finally:
        a.close()
        b.close()


def test_a_sha256_mismatch_fails_the_file_and_task_and_counts_nothing(db, owner, ex):
    tid = provision(db, "mismatch")
    task, files = make_task(db, tid, [{"path": "a", "size": 10, "sha256": SHA}, {"path": "b", "size": 10}])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    assert ex.complete(files[0], tokens[files[0]], sha="00" * 32) == ("SHA256_MISMATCH", "failed")
    bad = file_row(owner, files[0])
    assert bad["status"] == "failed" and bad["error"] == f"sha256 mismatch: expected {SHA}, got {'00' * 32}"
    # The task failed; its other file was cancelled and its lease is lost.
    assert task_status(owner, task) == "failed"
    other = file_row(owner, files[1])
    assert other["status"] == "cancelled" and other["assignment_token"] is None
    assert ex.complete(files[1], tokens[files[1]]) == ("LEASE_LOST", "failed")
    assert ex.complete(files[0], tokens[files[0]]) == ("LEASE_LOST", "failed")
    assert usage(owner, task) == []
    assert (
        owner.execute("SELECT error FROM dlw.tasks WHERE id = %s", (task,))
        .fetchone()["error"]
        .startswith("a: sha256 mismatch")
    )


HUGE = [1 << 62, 4_600_000_000_000_000_000, 9_223_372_036_854_775_807]
WRONG_COUNTS = [0, 9, 11, *HUGE]


def bytes_used(owner: psycopg.Connection, tenant_id: int) -> int:
    row = owner.execute("SELECT dlw.bytes_used_month(%s, dlw.month_start(now())) AS b", (tenant_id,)).fetchone()
    return int(row["b"])


@pytest.mark.parametrize("reported", WRONG_COUNTS)
def test_a_byte_count_other_than_the_declared_size_fails_the_file_and_counts_nothing(db, owner, ex, reported):
    """The attack: an executor reported 4.6e18 bytes for a 10-byte file, and every later task of
    its tenant was refused for the month. The declared size is a promise, so any other count
    means the file is not the one declared: it fails (with its task), and nothing is counted."""
    slug = f"size-wrong-{WRONG_COUNTS.index(reported)}"
    tid = tenant(db, slug, concurrent=0, bytes_month=1000, storage_gb=0)
    task, files = make_task(db, tid, [{"path": "a", "size": 10}, {"path": "b", "size": 10, "sha256": SHA}])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    assert ex.complete(files[0], tokens[files[0]], size=reported) == ("SIZE_MISMATCH", "failed")
    bad = file_row(owner, files[0])
    assert bad["status"] == "failed" and bad["bytes_done"] == 0
    assert bad["error"] == f"size mismatch: declared 10 bytes, reported {reported}"
    assert task_status(owner, task) == "failed"
    # The other file was cancelled, the failed one's lease is gone: nothing more can be counted.
    assert ex.complete(files[1], tokens[files[1]]) == ("LEASE_LOST", "failed")
    assert ex.complete(files[0], tokens[files[0]], size=10) == ("LEASE_LOST", "failed")
    assert usage(owner, task) == [] and bytes_used(owner, tid) == 0
    # The tenant's month is untouched: a task of its whole quota is still admitted.
    make_task(db, tid, [{"path": "whole-month", "size": 1000}])


def test_the_usage_counted_is_the_declared_size_and_zero_byte_files_count_zero(db, owner, ex):
    tid = provision(db, "size-exact")
    task, files = make_task(db, tid, [{"path": "a", "size": 0}, {"path": "b", "size": 7}, {"path": "c", "size": 0}])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(3)}
    assert ex.complete(files[0], tokens[files[0]], size=0) == ("completed", "running")
    assert ex.complete(files[1], tokens[files[1]], size=7) == ("completed", "running")
    # A replay with another count is the same success, and changes nothing.
    assert ex.complete(files[1], tokens[files[1]], size=HUGE[-1]) == ("already_completed", "running")
    assert usage(owner, task) == sorted([(f"file:{files[0]}", 0), (f"file:{files[1]}", 7)])
    assert ex.complete(files[2], tokens[files[2]], size=1) == ("SIZE_MISMATCH", "failed")
    assert usage(owner, task) == sorted([(f"file:{files[0]}", 0), (f"file:{files[1]}", 7)])


def test_a_heartbeat_beyond_the_declared_size_is_refused_and_changes_nothing(db, owner, ex):
    tid = provision(db, "size-heartbeat")
    _, (file,) = make_task(db, tid, [{"path": "a", "size": 10}])
    (claimed,) = ex.claim(1, lease=20)
    token = claimed["assignment_token"]
    before = file_row(owner, file)
    for done in (11, *HUGE):
        assert ex.heartbeat(file, token, done) == "SIZE_MISMATCH"
        assert file_row(owner, file) == before  # still assigned, same lease, no progress
    # A stale token learns nothing more than LEASE_LOST, whatever it reports.
    assert ex.heartbeat(file, uuid.uuid4(), HUGE[0]) == "LEASE_LOST"
    assert ex.heartbeat(file, token, 10) == "ok"
    assert file_row(owner, file)["bytes_done"] == 10
    assert ex.heartbeat(file, token, 11) == "SIZE_MISMATCH"
    assert file_row(owner, file)["bytes_done"] == 10
    # The refusal is no failure: the holder still has its lease and reports what it decides.
    assert ex.complete(file, token, size=10) == ("completed", "succeeded")
