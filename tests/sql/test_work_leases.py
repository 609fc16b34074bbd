"""The one lease mechanism of executor work (sql/38_work_leases.sql), for both kinds of work
item: files (downloads) and task deletions. The same locked lookup refuses a stale token with
LEASE_LOST and another tenant's item with NOT_FOUND, the same sweep returns expired leases to
the queue and fails an item out of attempts, the same failure report backs off, for both kinds;
the shared helpers are internal (dlw_app cannot call them)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

from tests.sql.test_task_deletions import (
    Executor,
    claim_deletions,
    make_task,
    owner,
    provision,
    quiet_queues,
    request,
    succeeded_task,
)
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

__all__ = ["owner", "quiet_queues"]  # the deletion tests' module fixtures, shared

KINDS = {  # the rows of the template's list in sql/38_work_leases.sql, in the same order of values
    "file": ["file", "dlw.task_files", "'assigned', 'running'", "bytes_done = 0", "dlw.executor_fail_final", "true"],
    "deletion": [
        "deletion",
        "dlw.task_deletions",
        "'assigned'",
        "updated_at = now()",
        "dlw.deletion_fail_final",
        "false",
    ],
}
MADE = {  # what the template makes for each kind
    "lease_lock_{}": "uuid,uuid,boolean",
    "lease_requeue_{}": "bigint[],uuid[],text[],timestamp with time zone,boolean",
    "lease_sweep_{}": "bigint,integer,integer",
    "lease_fail_{}": "uuid,uuid,text,boolean,integer,integer",
}
SHARED = [f"dlw.{name.format(kind)}({args})" for name, args in MADE.items() for kind in KINDS] + [
    "dlw.lease_claim_check(text,text,integer,integer,integer,text)"
]


def held_file(db: MigratedDb, tid: int, ex: Executor) -> dict[str, Any]:
    """A file of a new task, claimed by ex."""
    _, (file,) = make_task(db, tid, 1, repo=f"org/f-{uuid.uuid4().hex[:8]}")
    (claimed,) = ex.claim(1)
    assert claimed["file_id"] == file
    return claimed


def held_deletion(db: MigratedDb, tid: int, ex: Executor) -> dict[str, Any]:
    """The deletion of a finished task, claimed by ex."""
    task = succeeded_task(db, tid, [("a.bin", 1)], repo=f"org/d-{uuid.uuid4().hex[:8]}")
    assert request(db, tid, task)["outcome"] == "requested"
    (claimed,) = claim_deletions(ex, 1)
    assert claimed["task_id"] == task
    return claimed


def lease_lock(db: MigratedDb, scope: int, kind: str, item: uuid.UUID, token: uuid.UUID | None) -> dict[str, Any]:
    """dlw.lease_lock as the definer entry points run it: as dlw_system, in an executor context."""
    with db.owner() as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE dlw_system")
            as_tenant(conn, scope, "executor", user="exec-1")
            row = conn.execute(f"SELECT * FROM dlw.lease_lock_{kind}(%s, %s, true)", (item, token)).fetchone()
    assert row is not None
    return dict(row)


def expire(owner: psycopg.Connection, table: str, item: uuid.UUID, attempts: int | None = None) -> None:
    """The item's lease ran out (set in the past, not slept); optionally its attempts so far."""
    owner.execute(
        f"UPDATE dlw.{table} SET lease_expires_at = now() - interval '1 second',"
        " attempts = coalesce(%s, attempts) WHERE id = %s",
        (attempts, item),
    )


def expiries(owner: psycopg.Connection) -> int:
    row = owner.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n FROM dlw.lease_expiries").fetchone()
    return int(row["n"])


def test_both_kinds_refuse_a_stale_token_through_the_one_lookup(db, owner):
    tid, other = provision(db, "lease-stale"), provision(db, "lease-stale-other")
    ex = Executor(db, tid)
    try:
        items = {
            "file": (held_file(db, tid, ex), "file_id"),
            "deletion": (held_deletion(db, tid, ex), "deletion_id"),
        }
        for kind, (claimed, key) in items.items():
            item, token = claimed[key], claimed["assignment_token"]
            assert lease_lock(db, tid, kind, item, token)["refusal"] is None, kind
            stale = lease_lock(db, tid, kind, item, uuid.uuid4())
            assert (stale["refusal"], stale["tenant_id"]) == ("LEASE_LOST", tid), kind
            assert lease_lock(db, tid, kind, item, None)["refusal"] == "LEASE_LOST", kind
            # A system-wide executor finds it by id across tenants; another tenant's never learns of it.
            assert lease_lock(db, 0, kind, item, token)["refusal"] is None, kind
            assert lease_lock(db, other, kind, item, token) == dict.fromkeys(stale, None) | {"refusal": "NOT_FOUND"}
        # The entry points of both kinds answer LEASE_LOST for the stale token and change nothing.
        file, deletion = items["file"][0], items["deletion"][0]
        stale = uuid.uuid4()
        assert ex.heartbeat(file["file_id"], stale) == "LEASE_LOST"
        assert ex.fail(file["file_id"], stale, retryable=True)[0] == "LEASE_LOST"
        assert ex.release(file["file_id"], stale) == "LEASE_LOST"
        for call in (
            "SELECT outcome FROM dlw.executor_deletion_heartbeat(%s, %s)",
            "SELECT outcome FROM dlw.executor_deletion_complete(%s, %s)",
            "SELECT dlw.executor_deletion_fail(%s, %s, 'boom', true, 5) AS outcome",
        ):
            assert ex.call(call, deletion["deletion_id"], stale)[0]["outcome"] == "LEASE_LOST", call
        assert owner.execute(
            "SELECT status, assignment_token FROM dlw.task_deletions WHERE id = %s", (deletion["deletion_id"],)
        ).fetchone() == {"status": "assigned", "assignment_token": deletion["assignment_token"]}
        assert ex.heartbeat(file["file_id"], file["assignment_token"]) == "ok"
    finally:
        ex.close()


def test_the_one_sweep_requeues_expired_leases_of_both_kinds_then_fails_them_out_of_attempts(db, owner):
    tid = provision(db, "lease-sweep")
    ex = Executor(db, tid)
    try:
        file, deletion = held_file(db, tid, ex), held_deletion(db, tid, ex)
        expire(owner, "task_files", file["file_id"])
        expire(owner, "task_deletions", deletion["deletion_id"])
        counted = expiries(owner)

        # Attempts left: each kind's next claim takes its item back (a new token, attempt 2);
        # the first holder's token is lost. Only file expiries count for /metrics, as before.
        (again,) = ex.claim(1)
        assert (again["file_id"], again["attempts"]) == (file["file_id"], 2)
        assert expiries(owner) == counted + 1
        (d_again,) = claim_deletions(ex, 1)
        assert (d_again["deletion_id"], d_again["attempts"]) == (deletion["deletion_id"], 2)
        assert expiries(owner) == counted + 1
        assert ex.heartbeat(file["file_id"], file["assignment_token"]) == "LEASE_LOST"
        assert ex.call(
            "SELECT outcome FROM dlw.executor_deletion_heartbeat(%s, %s)",
            deletion["deletion_id"],
            deletion["assignment_token"],
        )[0]["outcome"] == ("LEASE_LOST")

        # Out of attempts: the next claim fails each item finally, as its kind fails.
        expire(owner, "task_files", file["file_id"], attempts=5)
        expire(owner, "task_deletions", deletion["deletion_id"], attempts=5)
        assert ex.claim(1) == []
        assert claim_deletions(ex, 1) == []
        f = owner.execute(
            "SELECT f.status, f.error, x.status AS task FROM dlw.task_files f"
            " JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id WHERE f.id = %s",
            (file["file_id"],),
        ).fetchone()
        assert (f["status"], f["task"]) == ("failed", "failed")
        assert f["error"].startswith("lease expired on attempt 5 of 5 (last held by exec-1/test)")
        d = owner.execute(
            "SELECT d.status, d.error, x.deletion FROM dlw.task_deletions d"
            " JOIN dlw.tasks x ON x.tenant_id = d.tenant_id AND x.id = d.task_id WHERE d.id = %s",
            (deletion["deletion_id"],),
        ).fetchone()
        assert (d["status"], d["deletion"]) == ("failed", "failed")
        assert d["error"].startswith("lease expired on attempt 5 of 5 (last held by exec-1/test)")
        assert expiries(owner) == counted + 2
    finally:
        ex.close()


def test_the_one_failure_report_backs_off_both_kinds_then_fails_at_the_last_attempt(db, owner):
    tid = provision(db, "lease-backoff")
    ex = Executor(db, tid)
    try:
        file, deletion = held_file(db, tid, ex), held_deletion(db, tid, ex)
        assert ex.fail(file["file_id"], file["assignment_token"], retryable=True)[0] == "requeued"
        (outcome,) = ex.call(
            "SELECT dlw.executor_deletion_fail(%s, %s, 'root not served', true, 5) AS o",
            deletion["deletion_id"],
            deletion["assignment_token"],
        )
        assert outcome["o"] == "requeued"
        for table, item in (("task_files", file["file_id"]), ("task_deletions", deletion["deletion_id"])):
            row = owner.execute(
                "SELECT status, assignment_token, lease_expires_at, attempts,"
                f" not_before > clock_timestamp() AS backs_off FROM dlw.{table} WHERE id = %s",
                (item,),
            ).fetchone()
            assert row == {
                "status": "pending",
                "assignment_token": None,
                "lease_expires_at": None,
                "attempts": 1,
                "backs_off": True,
            }, table
        # Not offered while it backs off, to any executor of either kind.
        assert ex.claim(1) == [] and claim_deletions(ex, 1) == []

        # The last attempt: a retryable failure is final, with the attempt count in the error.
        for table, item in (("task_files", file["file_id"]), ("task_deletions", deletion["deletion_id"])):
            owner.execute(f"UPDATE dlw.{table} SET not_before = NULL, attempts = 4 WHERE id = %s", (item,))
        (f,) = ex.claim(1)
        (d,) = claim_deletions(ex, 1)
        assert ex.fail(f["file_id"], f["assignment_token"], retryable=True) == ("failed", "failed")
        (outcome,) = ex.call(
            "SELECT dlw.executor_deletion_fail(%s, %s, 'root not served', true, 5) AS o",
            d["deletion_id"],
            d["assignment_token"],
        )
        assert outcome["o"] == "failed"
        errors_now = [
            owner.execute(f"SELECT error FROM dlw.{t} WHERE id = %s", (i,)).fetchone()["error"]
            for t, i in (("task_files", f["file_id"]), ("task_deletions", d["deletion_id"]))
        ]
        assert errors_now == ["boom (attempt 5 of 5)", "root not served (attempt 5 of 5)"]
    finally:
        ex.close()


def test_the_shared_helpers_are_internal(db):
    with psycopg.connect(db.app_url) as conn:
        for signature in SHARED:
            definer, app_may, config = conn.execute(
                "SELECT p.prosecdef, has_function_privilege('dlw_app', p.oid, 'EXECUTE'), p.proconfig"
                " FROM pg_proc p WHERE p.oid = %s::regprocedure",
                (signature,),
            ).fetchone()
            assert (definer, app_may) == (False, False), signature
            assert "search_path=pg_catalog, pg_temp" in config, signature
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            as_tenant(conn, 0, "executor", user="x")
            conn.execute("SELECT * FROM dlw.lease_lock_file(gen_random_uuid(), NULL, false)")


def template_of(source: str, row: list[str]) -> str:
    """A made function's source with its kind's values put back as the template's tokens."""
    kind, table, held, requeue_also, fail_final, count_expiries = row
    source = re.sub(rf"\b(lease_[a-z]+)_{kind}\b", r"\1_{kind}", source)
    for value, token in ((table, "{table}"), (held, "{held}"), (requeue_also, "{requeue_also}")):
        source = source.replace(value, token)
    source = source.replace(fail_final, "{fail_final}")
    return source.replace(f"IF {count_expiries} THEN", "IF {count_expiries} THEN")


def test_both_kinds_run_the_one_template_and_differ_only_by_their_row(db):
    """Each function of the deletion kind is the file kind's, but for the values of its row in
    the template's list: no kind has lease logic of its own."""
    with db.owner() as conn:
        for name in MADE:
            templates = set()
            for kind, row in KINDS.items():
                (source,) = conn.execute(
                    "SELECT prosrc FROM pg_proc WHERE proname = %s AND pronamespace = 'dlw'::regnamespace",
                    (name.format(kind),),
                ).fetchone()
                templates.add(template_of(source, row))
            assert len(templates) == 1, name
            made = templates.pop()
            assert "{table}" in made or "_{kind}(" in made, name  # the kind shows in each
