"""Set-based completion (sql/43_executor_batches.sql, dlw.executor_complete_set): a batch of
completions is judged item by item exactly as single completions are, but written in a few
statements: one UPDATE of the files (one change row for the queue summary), one usage row per
file, and one rollup per task."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.executor_sql import (
    SHA,
    Executor,
    empty_queue,
    ex,
    file_row,
    make_task,
    owner,
    provision,
    task_status,
    usage,
)

__all__ = ["empty_queue", "ex", "owner"]  # the executor tests' fixtures, shared (empty_queue: autouse)


def batch(ex: Executor, items: list[dict[str, Any]]) -> list[tuple[uuid.UUID, str, str | None]]:
    rows = ex.call("SELECT * FROM dlw.executor_report_batch(%s, '[]')", Jsonb(items))
    assert all(r["action"] == "complete" for r in rows)
    return [(r["file_id"], r["outcome"], r["task_status"]) for r in rows]


def item(file: uuid.UUID, token: uuid.UUID, size: int = 10, sha: str = SHA) -> dict[str, Any]:
    return {"file_id": str(file), "assignment_token": str(token), "bytes": size, "sha256": sha}


def audit(owner: psycopg.Connection, task: uuid.UUID) -> list[tuple[str, Any]]:
    rows = owner.execute(
        "SELECT action, detail FROM dlw.audit_log"
        " WHERE target = %s AND action LIKE 'task.%%' AND action <> 'task.created' ORDER BY at",
        (str(task),),
    )
    return [(r["action"], r["detail"]) for r in rows]


def test_each_item_is_judged_as_a_single_completion(db, owner, ex):
    tid = provision(db, "set-mixed")
    task, (a, b, c, d) = make_task(db, tid, [{"path": p, "size": 10, "sha256": SHA} for p in "abcd"])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(4)}
    nowhere = uuid.uuid4()
    answers = batch(
        ex,
        [
            item(a, tokens[a]),
            item(a, tokens[a]),  # the same report twice in one batch: counted once
            item(b, uuid.uuid4()),  # not its token
            item(c, tokens[c], sha=SHA.upper()),
            item(d, tokens[d], sha="00" * 32),  # not the manifest's content
            item(nowhere, uuid.uuid4()),
        ],
    )
    # The task's status after the batch: d's mismatch failed it (and cancelled b, unfinished).
    assert answers == [
        (a, "completed", "failed"),
        (b, "LEASE_LOST", "failed"),
        (c, "completed", "failed"),
        (d, "SHA256_MISMATCH", "failed"),
        (nowhere, "NOT_FOUND", None),
        (a, "already_completed", "failed"),
    ]
    # Files of the batch that did arrive stay succeeded, and only they are counted.
    assert [file_row(owner, f)["status"] for f in (a, b, c, d)] == ["succeeded", "cancelled", "succeeded", "failed"]
    assert usage(owner, task) == sorted([(f"file:{a}", 10), (f"file:{c}", 10)])
    assert file_row(owner, d)["error"] == f"sha256 mismatch: expected {SHA}, got {'00' * 32}"
    assert task_status(owner, task) == "failed"
    assert [action for action, _ in audit(owner, task)] == ["task.failed"]


def test_two_mismatches_of_one_task_fail_it_once(db, owner, ex):
    tid = provision(db, "set-two-bad")
    task, (a, b) = make_task(db, tid, [{"path": p, "size": 10, "sha256": SHA} for p in "ab"])
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    answers = dict((f, o) for f, o, _ in batch(ex, [item(a, tokens[a], size=9), item(b, tokens[b], size=11)]))
    # Whichever is handled first fails the task and cancels the other: its lease is lost.
    assert sorted(answers.values()) == ["LEASE_LOST", "SIZE_MISMATCH"]
    failed = next(f for f, o in answers.items() if o == "SIZE_MISMATCH")
    assert {f: file_row(owner, f)["status"] for f in (a, b)} == {
        f: ("failed" if f == failed else "cancelled") for f in (a, b)
    }
    assert usage(owner, task) == [] and task_status(owner, task) == "failed"
    assert [action for action, _ in audit(owner, task)] == ["task.failed"]


def test_a_whole_task_in_one_batch_is_one_write_and_one_rollup(db, owner, ex):
    tid = provision(db, "set-whole")
    task, files = make_task(db, tid, 50)
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(50)}
    changes = "SELECT count(*) AS n FROM dlw.executor_queue WHERE tenant_id = %s AND NOT folded"
    before = owner.execute(changes, (tid,)).fetchone()["n"]
    answers = batch(ex, [item(f, tokens[f]) for f in files])
    assert answers == [(f, "completed", "succeeded") for f in files]
    # One statement moved the 50 files: one change row for the queue summary, not 50.
    assert owner.execute(changes, (tid,)).fetchone()["n"] == before + 1
    assert len(usage(owner, task)) == 50 and {amount for _, amount in usage(owner, task)} == {10}
    assert audit(owner, task) == [("task.succeeded", {"bytes": 500})]
    # The summary stays exact: folded, the tenant has nothing pending or in flight.
    owner.execute("SELECT dlw.executor_queue_try_fold()")
    summary = owner.execute(
        "SELECT pending, in_flight FROM dlw.executor_queue WHERE tenant_id = %s AND folded", (tid,)
    ).fetchone()
    assert summary == {"pending": 0, "in_flight": 0}


def test_a_batch_spanning_tenants_and_tasks_rolls_each_task_up(db, owner, ex):
    one, two = provision(db, "set-one"), provision(db, "set-two")
    task_one, files_one = make_task(db, one, 2)
    task_two, files_two = make_task(db, two, 3)
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(5)}
    assert len(tokens) == 5
    # All of task one, part of task two.
    answers = batch(ex, [item(f, tokens[f]) for f in [*files_one, *files_two[:2]]])
    assert {status for f, _, status in answers if f in files_one} == {"succeeded"}
    assert {status for f, _, status in answers if f in files_two} == {"running"}
    assert task_status(owner, task_one) == "succeeded" and task_status(owner, task_two) == "running"
    assert (len(usage(owner, task_one)), len(usage(owner, task_two))) == (2, 2)
    assert batch(ex, [item(files_two[2], tokens[files_two[2]])]) == [(files_two[2], "completed", "succeeded")]
    assert audit(owner, task_two) == [("task.succeeded", {"bytes": 30})]


def test_a_negative_or_missing_byte_count_refuses_the_whole_batch(db, owner, ex):
    tid = provision(db, "set-bytes")
    task, (a, b) = make_task(db, tid, 2)
    tokens = {r["file_id"]: r["assignment_token"] for r in ex.claim(2)}
    for bad in ({**item(b, tokens[b]), "bytes": -1}, {k: v for k, v in item(b, tokens[b]).items() if k != "bytes"}):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="bytes must be >= 0"):
            batch(ex, [item(a, tokens[a]), bad])
    assert usage(owner, task) == [] and file_row(owner, a)["status"] == "assigned"
