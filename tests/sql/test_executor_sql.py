"""The executor functions in SQL (sql/40_executor_helpers.sql, 41_executor_claim.sql,
42_executor_reports.sql), driven as the API's role dlw_app with an
executor context, exactly as the routes call them: fair claims, leases and their tokens,
completion with usage counted once, failures and retries, expiry, cancellation, rollup, scope.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, as_tenant, tenant

SHA = "ab" * 32
FILE_COLUMNS = "status, attempts, assignment_token, lease_expires_at, executor_id, bytes_done, error"


def provision(db: MigratedDb, slug: str) -> int:
    return tenant(db, slug, **UNLIMITED)


def make_task(
    db: MigratedDb, tenant_id: int, files: int | list[dict[str, Any]] = 1, priority: int = 0, repo: str = "org/m"
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A task created through dlw.create_task as an operator; returns it and its file ids (by path)."""
    specs = files if isinstance(files, list) else [{"path": f"f{i:03d}", "size": 10} for i in range(files)]
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenant_id, "tenant_operator", user="op")
        outcome, task = conn.execute(
            "SELECT outcome, task_id FROM dlw.create_task(NULL, 'default', %s, 'main', %s, %s)",
            (repo, priority, Jsonb(specs)),
        ).fetchone()
        assert outcome == "created"
        ids = [r[0] for r in conn.execute("SELECT id FROM dlw.task_files WHERE task_id = %s ORDER BY path", (task,))]
    return task, ids


class Executor:
    """An executor as the API drives it: one dlw_app transaction per call, in its context."""

    def __init__(self, db: MigratedDb, tenant: int = 0, subject: str = "exec-1") -> None:
        self.conn = psycopg.connect(db.app_url, autocommit=True, row_factory=dict_row)
        self.tenant, self.subject = tenant, subject

    def call(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self.conn.transaction():
            as_tenant(self.conn, self.tenant, "executor", user=self.subject)
            return self.conn.execute(sql, args).fetchall()

    def claim(self, n: int = 10, lease: int = 60, attempts: int = 5) -> list[dict[str, Any]]:
        return self.call("SELECT * FROM dlw.executor_claim(%s, %s, 'test', %s)", n, lease, attempts)

    def heartbeat(self, file: uuid.UUID, token: uuid.UUID | None, done: int | None = None) -> str:
        return self.call("SELECT * FROM dlw.executor_heartbeat(%s, %s, %s)", file, token, done)[0]["outcome"]

    def complete(self, file: uuid.UUID, token: uuid.UUID | None, size: int = 10, sha: str = SHA) -> tuple[str, str]:
        row = self.call("SELECT * FROM dlw.executor_complete(%s, %s, %s, %s)", file, token, size, sha)[0]
        return row["outcome"], row["task_status"]

    def fail(self, file: uuid.UUID, token: uuid.UUID | None, retryable: bool, attempts: int = 5) -> tuple[str, str]:
        row = self.call("SELECT * FROM dlw.executor_fail(%s, %s, 'boom', %s, %s)", file, token, retryable, attempts)[0]
        return row["outcome"], row["task_status"]

    def release(self, file: uuid.UUID, token: uuid.UUID | None) -> str:
        return self.call("SELECT dlw.executor_release(%s, %s) AS outcome", file, token)[0]["outcome"]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    with db.owner() as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        yield conn


@pytest.fixture
def ex(db: MigratedDb) -> Iterator[Executor]:
    executor = Executor(db)
    yield executor
    executor.close()


def cancel_open_work(owner: psycopg.Connection) -> None:
    """No claimable file left: earlier tests' unfinished files and tasks are cancelled."""
    owner.execute(
        "UPDATE dlw.task_files SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL"
        " WHERE status IN ('pending', 'assigned', 'running')"
    )
    owner.execute("UPDATE dlw.tasks SET status = 'cancelled' WHERE status IN ('pending', 'running')")


@pytest.fixture(autouse=True)
def empty_queue(owner: psycopg.Connection) -> None:
    """Each test starts with no claimable file: earlier tests' leftovers are cancelled."""
    cancel_open_work(owner)


def file_row(owner: psycopg.Connection, file: uuid.UUID) -> dict[str, Any]:
    return owner.execute(f"SELECT {FILE_COLUMNS} FROM dlw.task_files WHERE id = %s", (file,)).fetchone()


def backoff_over(owner: psycopg.Connection, file: uuid.UUID) -> None:
    """The file's backoff after a retryable failure has passed (set in the past, not slept)."""
    owner.execute("UPDATE dlw.task_files SET not_before = created_at WHERE id = %s", (file,))


def task_status(owner: psycopg.Connection, task: uuid.UUID) -> str:
    return str(owner.execute("SELECT status FROM dlw.tasks WHERE id = %s", (task,)).fetchone()["status"])


def usage(owner: psycopg.Connection, task: uuid.UUID) -> list[tuple[str, int]]:
    rows = owner.execute(
        "SELECT event_key, amount FROM dlw.usage_records WHERE task_id = %s ORDER BY event_key", (task,)
    )
    return [(r["event_key"], r["amount"]) for r in rows]


def test_claim_is_fair_across_tenants_and_in_priority_order_within_one(db, owner, ex):
    busy, small1, small2 = provision(db, "fair-busy"), provision(db, "fair-s1"), provision(db, "fair-s2")
    _, bulk = make_task(db, busy, 30, priority=0)
    _, urgent = make_task(db, busy, 3, priority=5, repo="org/urgent")
    make_task(db, small1, 2)
    make_task(db, small2, 2)

    # One busy tenant with 33 queued files does not starve the others: with equal leases in
    # flight, each round serves every tenant once, the busy one with its highest priority first.
    rounds = [ex.claim(3), ex.claim(3)]
    for got in rounds:
        assert sorted(r["tenant_id"] for r in got) == sorted([busy, small1, small2])
    busy_claims = [r["file_id"] for got in rounds for r in got if r["tenant_id"] == busy]
    assert set(busy_claims) <= set(urgent)
    # The small tenants are drained; the busy one gets everything, urgent files before bulk ones.
    rest = ex.claim(5)
    assert [r["tenant_id"] for r in rest] == [busy] * 5
    assert [r["file_id"] for r in rest][:1] == [f for f in urgent if f not in busy_claims]
    assert {r["file_id"] for r in rest[1:]} <= set(bulk)
    for r in rest:
        assert r["tenant_slug"] == "fair-busy" and r["attempts"] == 1 and r["lease_seconds"] == 60
        assert r["repo_id"] in ("org/m", "org/urgent") and r["revision"] == "main"

    # A tenant with fewer leases in flight is served first, one file at a time too.
    late = provision(db, "fair-late")
    make_task(db, late, 3)
    assert [r["tenant_id"] for r in ex.claim(1)] == [late]
    assert [r["tenant_id"] for r in ex.claim(1)] == [late]
    assert sorted(r["tenant_id"] for r in ex.claim(2)) == sorted([late, busy])


def test_a_claim_assigns_fresh_tokens_and_starts_the_task(db, owner, ex):
    tid = provision(db, "claim-shape")
    task, files = make_task(db, tid, [{"path": "a.bin", "size": 7, "sha256": SHA}, {"path": "b.bin", "size": 9}])
    got = ex.claim(10, lease=30)
    assert {r["file_id"] for r in got} == set(files) and {r["task_id"] for r in got} == {task}
    assert {r["path"]: (r["size"], r["sha256"]) for r in got} == {"a.bin": (7, SHA), "b.bin": (9, None)}
    assert len({r["assignment_token"] for r in got}) == 2
    assert task_status(owner, task) == "running"
    for r in got:
        row = file_row(owner, r["file_id"])
        assert row["status"] == "assigned" and row["assignment_token"] == r["assignment_token"]
        assert row["executor_id"] == "exec-1/test" and row["lease_expires_at"] == r["lease_expires_at"]
        left = (r["lease_expires_at"] - owner.execute("SELECT clock_timestamp() AS t").fetchone()["t"]).total_seconds()
        assert 25 < left <= 30
    assert ex.claim(10) == []


def test_concurrent_claims_get_disjoint_files_and_never_wait(db, owner):
    tid = provision(db, "concurrent")
    make_task(db, tid, 12)
    a, b = Executor(db, subject="a"), Executor(db, subject="b")
    try:
        assert len(a.claim(1)) == 1  # the task is running now
        a.conn.execute("BEGIN")
        as_tenant(a.conn, 0, "executor", user="a")
        first = a.conn.execute("SELECT * FROM dlw.executor_claim(5, 60)").fetchall()
        # While a's claim is uncommitted (its files locked), b neither waits nor gets the same files.
        b.conn.execute("SET lock_timeout = '200ms'")
        started = time.monotonic()
        second = b.claim(5)
        assert time.monotonic() - started < 1
        a.conn.execute("COMMIT")
        assert len(first) == 5 and len(second) == 5
        assert not {r["file_id"] for r in first} & {r["file_id"] for r in second}
        assert owner.execute(
            "SELECT count(*) AS n, count(DISTINCT assignment_token) AS tokens FROM dlw.task_files"
            " WHERE tenant_id = %s AND status = 'assigned'",
            (tid,),
        ).fetchone() == {"n": 11, "tokens": 11}
    finally:
        a.close()
        b.close()


def test_a_tenant_limited_executor_only_ever_sees_its_tenant(db, owner, ex):
    mine, theirs = provision(db, "scope-mine"), provision(db, "scope-theirs")
    make_task(db, mine, 2)
    their_task, their_files = make_task(db, theirs, 2)
    limited = Executor(db, tenant=mine, subject="limited")
    try:
        got = limited.claim(10)
        assert {r["tenant_id"] for r in got} == {mine} and len(got) == 2
        # Even holding the real token of another tenant's file, it cannot touch it.
        held = ex.claim(10)
        assert {r["tenant_id"] for r in held} == {theirs}
        before = [file_row(owner, f) for f in their_files]
        for r in held:
            file, token = r["file_id"], r["assignment_token"]
            assert limited.heartbeat(file, token, 5) == "NOT_FOUND"
            assert limited.complete(file, token) == ("NOT_FOUND", None)
            assert limited.fail(file, token, retryable=False) == ("NOT_FOUND", None)
            assert limited.release(file, token) == "NOT_FOUND"
        assert [file_row(owner, f) for f in their_files] == before
        assert task_status(owner, their_task) == "running" and usage(owner, their_task) == []
    finally:
        limited.close()


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


def test_only_an_executor_context_may_call_the_executor_functions(db):
    tid = provision(db, "roles")
    make_task(db, tid, 1)
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        for context in ((tid, "tenant_admin"), (tid, "system_admin"), (None, None)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SELECT dlw.set_context(%s, 'x', %s)", context)
                conn.execute("SELECT * FROM dlw.executor_claim(1, 60)")
        for function in ("dlw.executor_scope()", "dlw.executor_sweep_expired_leases(bigint, integer, integer)"):
            assert not conn.execute("SELECT has_function_privilege('dlw_app', %s, 'EXECUTE')", (function,)).fetchone()[
                0
            ]
        for role in ("dlw_reporting", "dlw_admin"):
            assert not conn.execute(
                "SELECT has_function_privilege(%s, 'dlw.executor_claim(integer, integer, text, integer)', 'EXECUTE')",
                (role,),
            ).fetchone()[0]
        with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
            as_tenant(conn, 0, "executor", user="x")
            conn.execute("SELECT * FROM dlw.executor_claim(0, 60)")


def test_reporting_logins_never_see_assignment_tokens(db):
    with db.owner() as conn:
        privileges = conn.execute(
            "SELECT has_column_privilege('dlw_reporting', 'dlw.task_files', 'assignment_token', 'SELECT'),"
            " has_column_privilege('dlw_reporting', 'dlw.task_files', 'lease_seconds', 'SELECT')"
        ).fetchone()
    assert privileges == (False, True)
