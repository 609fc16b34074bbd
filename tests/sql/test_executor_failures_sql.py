"""Executor failures and lost leases in SQL (sql/40_executor_helpers.sql, 42_executor_reports.sql)
as the API's role: bounded retries, final failures, expired leases back to the queue,
cancellation winning over leases and claims, release without using an attempt.
"""

from __future__ import annotations

import threading
import time

import psycopg

from tests.support.executor_sql import (
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
from tests.support.tenants import as_tenant

__all__ = ["empty_queue", "ex", "owner"]  # shared fixtures (tests/support/executor_sql.py; empty_queue: autouse)


def test_retryable_failures_requeue_up_to_the_limit_then_fail(db, owner, ex):
    tid = provision(db, "retry")
    task, files = make_task(db, tid, 2)
    for attempt in (1, 2):
        got = {r["file_id"]: r for r in ex.claim(2, attempts=3)}
        claimed = got[files[0]]
        assert claimed["attempts"] == attempt
        assert ex.fail(files[0], claimed["assignment_token"], retryable=True, attempts=3) == ("requeued", "running")
        row = file_row(owner, files[0])
        assert (row["status"], row["assignment_token"], row["error"]) == ("pending", None, "boom")
        backoff_over(owner, files[0])  # (backoff: tests/sql/test_executor_backoff.py)
    (third,) = ex.claim(2, attempts=3)
    assert third["attempts"] == 3
    assert ex.fail(files[0], third["assignment_token"], retryable=True, attempts=3) == ("failed", "failed")
    assert file_row(owner, files[0])["error"] == "boom (attempt 3 of 3)"
    assert file_row(owner, files[1])["status"] == "cancelled"
    assert task_status(owner, task) == "failed"
    audit = owner.execute(
        "SELECT actor, detail FROM dlw.audit_log WHERE action = 'task.failed' AND target = %s", (str(task),)
    ).fetchone()
    assert audit["actor"] == "exec-1" and audit["detail"]["files_cancelled"] == 1


def test_a_non_retryable_failure_fails_at_once(db, owner, ex):
    tid = provision(db, "final")
    task, (file,) = make_task(db, tid, 1)
    (claimed,) = ex.claim(1)
    assert ex.fail(file, claimed["assignment_token"], retryable=False) == ("failed", "failed")
    assert ex.fail(file, claimed["assignment_token"], retryable=False) == ("LEASE_LOST", "failed")
    assert task_status(owner, task) == "failed" and usage(owner, task) == []


def test_expired_leases_return_to_the_queue_and_fail_when_out_of_attempts(db, owner, ex):
    tid = provision(db, "expiry")
    task, files = make_task(db, tid, 2)
    first = {r["file_id"]: r["assignment_token"] for r in ex.claim(2, attempts=2)}
    owner.execute(
        "UPDATE dlw.task_files SET lease_expires_at = clock_timestamp() - interval '1 s' WHERE id = %s", (files[0],)
    )
    # An expired lease is lost even before anyone sweeps it.
    assert ex.heartbeat(files[0], first[files[0]]) == "LEASE_LOST"
    assert ex.complete(files[0], first[files[0]]) == ("LEASE_LOST", "running")
    # The next claim puts it back in the queue and hands it out again, with a new token.
    (again,) = ex.claim(2, attempts=2)
    assert again["file_id"] == files[0] and again["attempts"] == 2 and again["assignment_token"] != first[files[0]]
    assert ex.complete(files[0], first[files[0]]) == ("LEASE_LOST", "running")
    # Out of attempts, the next expiry fails the file and its task.
    owner.execute(
        "UPDATE dlw.task_files SET lease_expires_at = clock_timestamp() - interval '1 s' WHERE id = %s", (files[0],)
    )
    assert ex.claim(2, attempts=2) == []
    row = file_row(owner, files[0])
    assert row["status"] == "failed" and row["error"].startswith("lease expired on attempt 2 of 2")
    assert task_status(owner, task) == "failed"
    assert ex.complete(files[1], first[files[1]]) == ("LEASE_LOST", "failed")


def test_cancelling_a_task_makes_its_leases_lost(db, owner, ex):
    tid = provision(db, "cancel")
    task, _ = make_task(db, tid, 3)
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    held = list(tokens)
    assert ex.heartbeat(held[0], tokens[held[0]]) == "ok"
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_operator", user="op")
        assert conn.execute("SELECT dlw.cancel_task(%s)", (task,)).fetchone()[0] == "cancelled"
    for file in held:
        assert ex.heartbeat(file, tokens[file]) == "LEASE_LOST"
        assert ex.complete(file, tokens[file]) == ("LEASE_LOST", "cancelled")
    assert ex.claim(5) == []
    assert usage(owner, task) == []


def test_a_cancel_racing_a_claim_still_wins(db, owner, ex):
    """The claim holds the task's pending files while a cancel waits for them: no deadlock, and
    the files the claim assigned lose their lease as soon as the cancel goes through."""
    tid = provision(db, "cancel-race")
    task, _ = make_task(db, tid, 4)
    ex.claim(1)
    ex.conn.execute("BEGIN")
    as_tenant(ex.conn, 0, "executor", user="exec-1")
    claimed = ex.conn.execute("SELECT * FROM dlw.executor_claim(2, 60)").fetchall()
    outcome: list[str] = []

    def cancel() -> None:
        with psycopg.connect(db.app_url) as conn:
            as_tenant(conn, tid, "tenant_operator", user="op")
            outcome.append(conn.execute("SELECT dlw.cancel_task(%s)", (task,)).fetchone()[0])

    thread = threading.Thread(target=cancel)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # waiting for the claimed files
    ex.conn.execute("COMMIT")
    thread.join(10)
    assert outcome == ["cancelled"]
    for r in claimed:
        assert ex.complete(r["file_id"], r["assignment_token"]) == ("LEASE_LOST", "cancelled")


def test_release_gives_the_file_back_without_using_an_attempt(db, owner, ex):
    tid = provision(db, "release")
    _, (file,) = make_task(db, tid, 1)
    (claimed,) = ex.claim(1)
    assert ex.release(file, claimed["assignment_token"]) == "released"
    row = file_row(owner, file)
    assert (row["status"], row["attempts"], row["assignment_token"], row["lease_expires_at"]) == (
        "pending",
        0,
        None,
        None,
    )
    assert ex.release(file, claimed["assignment_token"]) == "LEASE_LOST"
    (again,) = ex.claim(1)
    assert again["attempts"] == 1
