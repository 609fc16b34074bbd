"""Backoff after a retryable failure, kept in the database (migrations/0023, dlw.retry_backoff in
sql/40_executor_helpers.sql, dlw.executor_fail, dlw.executor_claim): a requeued file is offered
to no executor before its not_before; the wait grows with attempts, with jitter, and honours the
hub's Retry-After. Bounds come from dlw.domain_facts(); nothing sleeps (not_before is moved into
the past instead)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.database import MigratedDb
from tests.support.executor_sql import Executor, backoff_over, empty_queue, make_task, provision

__all__ = ["empty_queue"]  # autouse: each test starts with an empty queue


@pytest.fixture(scope="module")
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    with db.owner() as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        yield conn


@pytest.fixture(scope="module")
def facts(owner: psycopg.Connection) -> dict[str, Any]:
    return dict(owner.execute("SELECT * FROM dlw.domain_facts()").fetchone())  # type: ignore[arg-type]


@pytest.fixture
def executors(db: MigratedDb) -> Iterator[tuple[Executor, Executor]]:
    one, two = Executor(db, subject="exec-1"), Executor(db, subject="exec-2")
    yield one, two
    one.close()
    two.close()


def now(owner: psycopg.Connection) -> datetime:
    return owner.execute("SELECT clock_timestamp() AS t").fetchone()["t"]  # type: ignore[index,no-any-return]


def fail(ex: Executor, file: uuid.UUID, token: uuid.UUID, retry_after: int | None = None) -> str:
    row = ex.call("SELECT * FROM dlw.executor_fail(%s, %s, 'HTTP 503', true, 10, %s)", file, token, retry_after)[0]
    return str(row["outcome"])


def failed_wait(
    owner: psycopg.Connection, ex: Executor, file: uuid.UUID, token: uuid.UUID, **kw: Any
) -> tuple[timedelta, timedelta]:
    """Fails the file retryably; returns the bounds of its wait (not_before minus the clock just
    after and just before the report), so that lower <= wait <= upper holds for the true wait."""
    before = now(owner)
    assert fail(ex, file, token, **kw) == "requeued"
    after = now(owner)
    not_before = owner.execute("SELECT not_before FROM dlw.task_files WHERE id = %s", (file,)).fetchone()["not_before"]
    return not_before - after, not_before - before


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def test_a_failed_file_is_offered_to_no_executor_until_its_backoff_passed(db, owner, facts, executors):
    one, two = executors
    tid = provision(db, "backoff-two")
    _, (file,) = make_task(db, tid, 1)
    (claimed,) = one.claim(1, attempts=10)
    low, high = failed_wait(owner, one, file, claimed["assignment_token"])
    base = facts["retry_backoff_base_seconds"]
    assert seconds(base) - seconds(0.001) <= high and low <= seconds(2 * base)  # attempt 1: [base, 2 base)
    assert two.claim(10, attempts=10) == [] and one.claim(10, attempts=10) == []
    backoff_over(owner, file)
    (again,) = two.claim(10, attempts=10)
    assert (again["file_id"], again["attempts"]) == (file, 2)
    row = owner.execute("SELECT not_before, executor_id FROM dlw.task_files WHERE id = %s", (file,)).fetchone()
    assert row == {"not_before": None, "executor_id": "exec-2/test"}


def test_a_backing_off_file_holds_back_only_itself(db, owner, executors):
    one, two = executors
    tid = provision(db, "backoff-queue")
    _, files = make_task(db, tid, 2)
    claimed = {r["file_id"]: r for r in one.claim(1, attempts=10)}
    (first,) = claimed
    assert fail(one, first, claimed[first]["assignment_token"]) == "requeued"
    (other,) = two.claim(10, attempts=10)
    assert other["file_id"] == next(f for f in files if f != first)


def test_the_wait_grows_with_attempts_up_to_the_cap(db, owner, facts, executors):
    one, _ = executors
    tid = provision(db, "backoff-grow")
    _, (file,) = make_task(db, tid, 1)
    base, cap = facts["retry_backoff_base_seconds"], facts["retry_backoff_max_seconds"]
    previous_high = timedelta(0)
    for attempt in range(1, 10):
        (claimed,) = one.claim(1, attempts=10)
        assert claimed["attempts"] == attempt
        low, high = failed_wait(owner, one, file, claimed["assignment_token"])
        # Attempt n waits in [base * 2^(n-1), base * 2^n) (jitter in [1, 2)), capped.
        floor, ceiling = min(cap, base * 2 ** (attempt - 1)), min(cap, base * 2**attempt)
        assert seconds(floor) - seconds(0.001) <= high and low <= seconds(ceiling), (attempt, low, high)
        if floor < cap:
            assert low >= previous_high - seconds(1), attempt  # each range starts where the last ended
        previous_high = high
        backoff_over(owner, file)
    assert high <= seconds(cap) + seconds(1)


def test_the_hubs_retry_after_is_honoured_when_longer_and_capped(db, owner, facts, executors):
    one, two = executors
    tid = provision(db, "backoff-retry-after")
    _, (file,) = make_task(db, tid, 1)
    longer = facts["retry_backoff_base_seconds"] * 4 + 60
    (claimed,) = one.claim(1, attempts=10)
    low, high = failed_wait(owner, one, file, claimed["assignment_token"], retry_after=longer)
    assert low <= seconds(longer) <= high
    assert two.claim(10, attempts=10) == []
    backoff_over(owner, file)
    (claimed,) = two.claim(1, attempts=10)
    huge = facts["retry_after_max_seconds"] * 10
    low, high = failed_wait(owner, two, file, claimed["assignment_token"], retry_after=huge)
    assert low <= seconds(facts["retry_after_max_seconds"]) <= high
    # A Retry-After shorter than the backoff: the backoff wins.
    backoff_over(owner, file)
    (claimed,) = one.claim(1, attempts=10)
    low, high = failed_wait(owner, one, file, claimed["assignment_token"], retry_after=0)
    assert seconds(facts["retry_backoff_base_seconds"] * 2 ** (claimed["attempts"] - 1)) - seconds(0.001) <= high
    backoff_over(owner, file)
    (claimed,) = one.claim(1, attempts=10)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        fail(one, file, claimed["assignment_token"], retry_after=-1)


def test_not_before_is_checked(owner, db):
    tid = provision(db, "backoff-check")
    _, (file,) = make_task(db, tid, 1)
    with pytest.raises(psycopg.errors.CheckViolation):
        owner.execute("UPDATE dlw.task_files SET not_before = created_at - interval '1 s' WHERE id = %s", (file,))


def test_a_tenant_whose_files_all_back_off_takes_no_turn_from_another(db, owner, executors):
    """Tenant a's only file backs off while a ranks first (no file in flight, served longest
    ago): a one-file claim still returns tenant b's file, not nothing."""
    one, _ = executors
    a, b = provision(db, "backoff-turn-a"), provision(db, "backoff-turn-b")
    _, (file_a,) = make_task(db, a, 1)
    (claimed,) = one.claim(1, attempts=10)
    assert claimed["file_id"] == file_a and fail(one, file_a, claimed["assignment_token"]) == "requeued"
    _, (first_b,) = make_task(db, b, 1)
    (claimed,) = one.claim(1, attempts=10)  # b is served after a
    assert (
        one.call(
            "SELECT * FROM dlw.executor_complete(%s, %s, 10, %s)", first_b, claimed["assignment_token"], "ab" * 32
        )[0]["outcome"]
        == "completed"
    )
    _, (second_b,) = make_task(db, b, 1)
    (claimed,) = one.claim(1, attempts=10)
    assert claimed["file_id"] == second_b
