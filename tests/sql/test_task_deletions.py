"""Deleting a task's files in SQL (sql/34_task_deletion_rules.sql, sql/44_executor_deletions.sql),
driven as the API's role dlw_app exactly as the routes call it: the request (live tasks refused,
idempotent, no retry after it), the plan (what other tasks still hold is kept), the release
(computed once, shared content released at the last deletion), leases that expire and are taken
by another executor, the file claim held back while a deletion runs, and isolation: another
tenant cannot delete, see or detect a task's deletion, through any function or table."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

from tests.support.database import MigratedDb
from tests.support.executor_sql import Executor, cancel_open_work, make_task, owner, provision
from tests.support.tenants import as_tenant

__all__ = ["owner"]  # the executor tests' module fixture, shared


def sha(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture(autouse=True)
def quiet_queues(owner: psycopg.Connection) -> None:
    """Each test starts with nothing claimable: earlier tests' leftovers are finished."""
    cancel_open_work(owner)
    owner.execute("UPDATE dlw.task_deletions SET status = 'failed' WHERE status IN ('pending', 'assigned')")


def succeeded_task(db: MigratedDb, tid: int, files: list[tuple[str, int]], repo: str = "org/m") -> uuid.UUID:
    """A task whose files (path, content number) all succeeded, downloaded by a real claim."""
    specs = [{"path": path, "size": 10, "sha256": sha(n)} for path, n in files]
    task, ids = make_task(db, tid, specs, repo=repo)
    ex = Executor(db, tid)
    try:
        claimed = {r["file_id"]: r for r in ex.claim(100)}
        assert set(ids) <= set(claimed)
        for file_id, row in claimed.items():
            if file_id in ids:
                assert ex.complete(file_id, row["assignment_token"], 10, row["sha256"])[0] == "completed"
            else:  # another task's file (a live task of the test): back to the queue
                assert ex.release(file_id, row["assignment_token"]) == "released"
    finally:
        ex.close()
    return task


def request(db: MigratedDb, tid: int, task: uuid.UUID, role: str = "tenant_operator") -> dict[str, Any]:
    with psycopg.connect(db.app_url, row_factory=dict_row) as conn:
        as_tenant(conn, tid, role)
        row = conn.execute("SELECT * FROM dlw.delete_task(%s)", (task,)).fetchone()
        assert row is not None
        return dict(row)


def claim_deletions(ex: Executor, n: int = 10, lease: int = 60) -> list[dict[str, Any]]:
    return ex.call("SELECT * FROM dlw.executor_claim_deletions(%s, %s, 'test', 5)", n, lease)


def complete(ex: Executor, deletion: uuid.UUID, token: uuid.UUID | None) -> dict[str, Any]:
    return ex.call("SELECT * FROM dlw.executor_deletion_complete(%s, %s)", deletion, token)[0]


def removed(plan: dict[str, Any]) -> dict[str, bool]:
    return {f["path"]: f["remove_path"] for f in plan["files"]}


def test_a_live_task_is_refused_a_finished_one_queued_once_and_never_retried(db, owner):
    tid = provision(db, "del-request")
    live, _ = make_task(db, tid, 1)
    assert request(db, tid, live) == {"outcome": "TASK_LIVE", "deletion": None}
    done = succeeded_task(db, tid, [("a.bin", 1)])
    assert request(db, tid, done) == {"outcome": "requested", "deletion": "deleting"}
    assert request(db, tid, done) == {"outcome": "unchanged", "deletion": "deleting"}  # again: no error
    rows = owner.execute("SELECT status, attempts FROM dlw.task_deletions WHERE task_id = %s", (done,)).fetchall()
    assert rows == [{"status": "pending", "attempts": 0}]
    # A failed task being deleted cannot be retried, and its status is frozen whoever writes it.
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_operator")
        assert conn.execute("SELECT outcome FROM dlw.retry_task(%s)", (done,)).fetchone() == ("TASK_DELETED",)
    with pytest.raises(psycopg.Error, match="illegal task transition"):
        owner.execute("UPDATE dlw.tasks SET status = 'pending' WHERE id = %s", (done,))
    # A viewer may not ask (the route refuses first; the function too).
    with pytest.raises(errors.InsufficientPrivilege):
        request(db, tid, done, role="tenant_viewer")


def test_the_plan_keeps_what_another_task_holds_and_the_release_comes_at_the_last_deletion(db, owner):
    tid = provision(db, "del-shared")
    first = succeeded_task(db, tid, [("shared.bin", 1), ("own.bin", 2)])
    second = succeeded_task(db, tid, [("shared.bin", 1), ("other.bin", 3)])
    assert request(db, tid, first)["outcome"] == "requested"
    ex = Executor(db, tid)
    try:
        [d] = claim_deletions(ex)
        assert d["task_id"] == first and d["attempts"] == 1
        assert removed(d["plan"]) == {"own.bin": True, "shared.bin": False}
        assert d["plan"]["layout"] == "tree" and d["plan"]["revision"] == "main"
        done = complete(ex, d["deletion_id"], d["assignment_token"])
        # Only the content no other task holds is released: own.bin's.
        assert done["outcome"] == "deleted" and done["released_bytes"] == 10
        assert [r["sha256"] for r in done["released"]] == [sha(2)]
        assert complete(ex, d["deletion_id"], d["assignment_token"])["outcome"] == "already_deleted"
        assert (
            owner.execute("SELECT deletion FROM dlw.tasks WHERE id = %s", (first,)).fetchone()["deletion"] == "deleted"
        )

        assert request(db, tid, second)["outcome"] == "requested"
        [d2] = claim_deletions(ex)
        assert removed(d2["plan"]) == {"other.bin": True, "shared.bin": True}  # the first is deleted
        done2 = complete(ex, d2["deletion_id"], d2["assignment_token"])
        assert sorted(r["sha256"] for r in done2["released"]) == [sha(1), sha(3)] and done2["released_bytes"] == 20
    finally:
        ex.close()


def test_two_deletions_of_shared_content_release_it_once(db):
    tid = provision(db, "del-twice")
    a = succeeded_task(db, tid, [("x.bin", 7)], repo="org/a")
    b = succeeded_task(db, tid, [("x.bin", 7)], repo="org/b")  # same content, another repository
    request(db, tid, a)
    request(db, tid, b)
    ex = Executor(db, tid)
    try:
        claimed = {d["task_id"]: d for d in claim_deletions(ex)}
        assert set(claimed) == {a, b}
        assert all(removed(d["plan"]) == {"x.bin": True} for d in claimed.values())  # neither holds for the other
        first = complete(ex, claimed[a]["deletion_id"], claimed[a]["assignment_token"])
        second = complete(ex, claimed[b]["deletion_id"], claimed[b]["assignment_token"])
    finally:
        ex.close()
    assert first["released"] == [] and [r["sha256"] for r in second["released"]] == [sha(7)]


def test_an_expired_lease_is_taken_by_another_executor_and_the_first_holder_loses_it(db, owner):
    tid = provision(db, "del-expiry")
    task = succeeded_task(db, tid, [("a.bin", 11)])
    request(db, tid, task)
    one, two = Executor(db, tid, "exec-one"), Executor(db, 0, "exec-two")
    try:
        [d] = claim_deletions(one, lease=5)
        assert claim_deletions(two) == []  # held
        owner.execute(
            "UPDATE dlw.task_deletions SET lease_expires_at = clock_timestamp() - interval '1 second' WHERE id = %s",
            (d["deletion_id"],),
        )
        [again] = [r for r in claim_deletions(two) if r["deletion_id"] == d["deletion_id"]]
        assert again["attempts"] == 2 and again["assignment_token"] != d["assignment_token"]
        assert complete(one, d["deletion_id"], d["assignment_token"])["outcome"] == "LEASE_LOST"
        assert complete(two, again["deletion_id"], again["assignment_token"])["outcome"] == "deleted"
        executor = owner.execute("SELECT executor_id FROM dlw.task_deletions WHERE id = %s", (d["deletion_id"],))
        assert executor.fetchone()["executor_id"].startswith("exec-two")
    finally:
        one.close()
        two.close()


def busy_then_quiet(db: MigratedDb, slug: str, content: int) -> list[uuid.UUID]:
    """Three deletions asked by one tenant ("busy"), then one by another ("quiet"): their tasks."""
    busy, quiet = provision(db, f"{slug}-busy"), provision(db, f"{slug}-quiet")
    asked = [succeeded_task(db, busy, [(f"b{i}.bin", content + i)], repo=f"org/{slug}{i}") for i in range(3)]
    asked.append(succeeded_task(db, quiet, [("q.bin", content + 10)], repo=f"org/{slug}-quiet"))
    for tid, task in zip([busy, busy, busy, quiet], asked, strict=True):
        assert request(db, tid, task)["outcome"] == "requested"
    return asked


def test_one_tenants_many_deletions_delay_no_other_tenants(db):
    """A system-wide executor claims deletions fairly: the tenant with the fewest in flight first,
    then the older request. Busy asked for three deletions before quiet asked for one; quiet's
    comes second, not fourth (oldest first across tenants, as it was, served busy's three first)."""
    asked = busy_then_quiet(db, "del-fair", 40)
    ex = Executor(db, 0, "exec-fair")
    try:
        order = [claim_deletions(ex, 1)[0]["task_id"] for _ in range(4)]
        assert order == [asked[0], asked[3], asked[1], asked[2]]
        assert claim_deletions(ex) == []
    finally:
        ex.close()


def test_a_fair_claim_of_several_spreads_them_and_a_concurrent_one_takes_the_next(db, owner):
    """Two at once go to two tenants; a second claim while the first is still open (its rows
    locked) gets the next deletions, not nothing (it must not pick the same rows and skip them)."""
    asked = busy_then_quiet(db, "del-spread", 60)
    claim = "SELECT task_id FROM dlw.executor_claim_deletions(%s, 60, 'test', 5)"
    with psycopg.connect(db.app_url) as first, psycopg.connect(db.app_url) as second:
        as_tenant(first, 0, "executor", user="exec-first")  # in a transaction, held open
        assert {r[0] for r in first.execute(claim, (2,)).fetchall()} == {asked[0], asked[3]}
        as_tenant(second, 0, "executor", user="exec-second")
        assert [r[0] for r in second.execute(claim, (1,)).fetchall()] == [asked[1]]
        second.commit()
        first.commit()


def test_a_failed_deletion_shows_on_the_task_and_delete_again_requeues_it(db, owner):
    tid = provision(db, "del-fail")
    task = succeeded_task(db, tid, [("a.bin", 12)])
    request(db, tid, task)
    ex = Executor(db, tid)
    try:
        [d] = claim_deletions(ex)
        fail = "SELECT dlw.executor_deletion_fail(%s, %s, 'root unreachable', %s, 5) AS outcome"
        assert ex.call(fail, d["deletion_id"], d["assignment_token"], True)[0]["outcome"] == "requeued"
        row = owner.execute(
            "SELECT status, not_before > now() AS backs_off FROM dlw.task_deletions WHERE id = %s", (d["deletion_id"],)
        ).fetchone()
        assert row == {"status": "pending", "backs_off": True}
        assert claim_deletions(ex) == []  # backing off
        owner.execute("UPDATE dlw.task_deletions SET not_before = NULL WHERE id = %s", (d["deletion_id"],))
        [d] = claim_deletions(ex)
        assert ex.call(fail, d["deletion_id"], d["assignment_token"], False)[0]["outcome"] == "failed"
        assert owner.execute("SELECT deletion FROM dlw.tasks WHERE id = %s", (task,)).fetchone()["deletion"] == "failed"
        assert request(db, tid, task) == {"outcome": "requested", "deletion": "deleting"}
        [d] = claim_deletions(ex)
        assert d["attempts"] == 1 and complete(ex, d["deletion_id"], d["assignment_token"])["outcome"] == "deleted"
    finally:
        ex.close()


def test_no_file_of_the_same_repository_and_target_is_claimed_while_a_deletion_runs(db):
    tid = provision(db, "del-hold")
    old = succeeded_task(db, tid, [("w.bin", 21)])
    request(db, tid, old)
    ex = Executor(db, tid)
    try:
        [d] = claim_deletions(ex)
        _, [new_file] = make_task(db, tid, [{"path": "w.bin", "size": 10, "sha256": sha(21)}])
        _, [elsewhere] = make_task(db, tid, [{"path": "w.bin", "size": 10}], repo="org/other")
        assert [r["file_id"] for r in ex.claim()] == [elsewhere]  # another repository: not held back
        assert complete(ex, d["deletion_id"], d["assignment_token"])["outcome"] == "deleted"
        assert [r["file_id"] for r in ex.claim()] == [new_file]  # once the deletion is done
    finally:
        ex.close()


def test_another_tenant_cannot_delete_see_or_detect_a_deletion(db, owner):
    a, b = provision(db, "del-iso-a"), provision(db, "del-iso-b")
    task = succeeded_task(db, a, [("secret.bin", 31)])
    # Tenant B asks to delete A's task: the same answer as for an id that does not exist.
    assert request(db, b, task) == {"outcome": "NOT_FOUND", "deletion": None}
    assert request(db, b, uuid.uuid4()) == {"outcome": "NOT_FOUND", "deletion": None}
    assert (
        owner.execute("SELECT count(*) AS n FROM dlw.task_deletions WHERE task_id = %s", (task,)).fetchone()["n"] == 0
    )
    request(db, a, task)
    deletion = owner.execute("SELECT id FROM dlw.task_deletions WHERE task_id = %s", (task,)).fetchone()["id"]
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, b, "tenant_admin")
        assert conn.execute("SELECT count(*) FROM dlw.task_deletions").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM dlw.tasks WHERE id = %s", (task,)).fetchone() == (0,)
        # No write on the work items at all, and no way to mark a deletion by hand.
        for statement in (
            "UPDATE dlw.task_deletions SET status = 'done'",
            "DELETE FROM dlw.task_deletions",
            f"INSERT INTO dlw.task_deletions (tenant_id, task_id) VALUES ({a}, gen_random_uuid())",
        ):
            with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)
    with psycopg.connect(db.app_url) as conn:  # even in its own tenant, dlw_app cannot set the marker
        as_tenant(conn, a, "tenant_admin")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE dlw.tasks SET deletion = 'deleted' WHERE id = %s", (task,))
    # An executor limited to B neither claims nor reports A's deletion (NOT_FOUND, as for no id).
    exb = Executor(db, b, "exec-b")
    exa = Executor(db, a, "exec-a")
    try:
        assert claim_deletions(exb) == []
        [d] = claim_deletions(exa)
        assert d["deletion_id"] == deletion
        for token in (d["assignment_token"], None):
            assert complete(exb, deletion, token)["outcome"] == "NOT_FOUND"
            assert complete(exb, uuid.uuid4(), token)["outcome"] == "NOT_FOUND"
        beat = "SELECT * FROM dlw.executor_deletion_heartbeat(%s, %s)"
        assert exb.call(beat, deletion, d["assignment_token"])[0]["outcome"] == "NOT_FOUND"
        fail = "SELECT dlw.executor_deletion_fail(%s, %s, 'x', false, 5) AS outcome"
        assert exb.call(fail, deletion, d["assignment_token"])[0]["outcome"] == "NOT_FOUND"
        assert complete(exa, deletion, d["assignment_token"])["outcome"] == "deleted"
    finally:
        exa.close()
        exb.close()
    # Outside an executor context the executor functions refuse.
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, b, "tenant_admin")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM dlw.executor_claim_deletions(1, 60, 'x', 5)")


def test_concurrent_requests_queue_one_deletion(db, owner):
    tid = provision(db, "del-race")
    task = succeeded_task(db, tid, [("a.bin", 41)])
    first = psycopg.connect(db.app_url)
    try:
        as_tenant(first, tid, "tenant_operator")  # its transaction stays open: the task row stays locked
        assert first.execute("SELECT outcome FROM dlw.delete_task(%s)", (task,)).fetchone() == ("requested",)
        answers: list[dict[str, Any]] = []
        waiter = threading.Thread(target=lambda: answers.append(request(db, tid, task)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not answers  # waits for the first request's lock
        first.commit()
        waiter.join(10)
        assert answers == [{"outcome": "unchanged", "deletion": "deleting"}]
    finally:
        first.close()
    rows = owner.execute("SELECT count(*) AS n FROM dlw.task_deletions WHERE task_id = %s", (task,)).fetchone()
    assert rows["n"] == 1
