"""The one lease mechanism of executor work (sql/38_work_leases.sql), for both kinds of work
item: files (downloads) and task deletions. The same locked lookup refuses a stale token with
LEASE_LOST and another tenant's item with NOT_FOUND, the same sweep returns expired leases to
the queue and fails an item out of attempts, the same failure report backs off, for both kinds;
the shared helpers are internal (dlw_app cannot call them)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

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


class Held(NamedTuple):
    """An executor of one tenant holding a file and a deletion; each item's id under item."""

    ex: Executor
    file: dict[str, Any]
    deletion: dict[str, Any]

    def item(self, kind: str) -> tuple[uuid.UUID, uuid.UUID]:
        claimed = self.file if kind == "file" else self.deletion
        return claimed[f"{kind}_id"], claimed["assignment_token"]


@pytest.fixture
def held(db: MigratedDb) -> Iterator[Held]:
    tid = provision(db, f"lease-{uuid.uuid4().hex[:8]}")
    ex = Executor(db, tid)
    try:
        yield Held(ex, held_file(db, tid, ex), held_deletion(db, tid, ex))
    finally:
        ex.close()


def deletion_heartbeat(ex: Executor, deletion: uuid.UUID, token: uuid.UUID | None) -> str:
    return str(ex.call("SELECT outcome FROM dlw.executor_deletion_heartbeat(%s, %s)", deletion, token)[0]["outcome"])


def deletion_fail(ex: Executor, deletion: uuid.UUID, token: uuid.UUID | None) -> str:
    call = "SELECT dlw.executor_deletion_fail(%s, %s, 'root not served', true, 5) AS outcome"
    return str(ex.call(call, deletion, token)[0]["outcome"])


def kind_row(owner: psycopg.Connection, kind: str, item: uuid.UUID) -> dict[str, Any]:
    """The item's status and error, and its task's status and deletion marker."""
    table = "task_files" if kind == "file" else "task_deletions"
    return dict(
        owner.execute(
            f"SELECT w.status, w.error, x.status AS task, x.deletion FROM dlw.{table} w"
            " JOIN dlw.tasks x ON x.tenant_id = w.tenant_id AND x.id = w.task_id WHERE w.id = %s",
            (item,),
        ).fetchone()
    )


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


def test_both_kinds_refuse_a_stale_token_through_the_one_lookup(db, owner, held):
    tid, other = held.ex.tenant, provision(db, "lease-stale-other")
    for kind in KINDS:
        item, token = held.item(kind)
        assert lease_lock(db, tid, kind, item, token)["refusal"] is None, kind
        stale = lease_lock(db, tid, kind, item, uuid.uuid4())
        assert (stale["refusal"], stale["tenant_id"]) == ("LEASE_LOST", tid), kind
        assert lease_lock(db, tid, kind, item, None)["refusal"] == "LEASE_LOST", kind
        # A system-wide executor finds it by id across tenants; another tenant's never learns of it.
        assert lease_lock(db, 0, kind, item, token)["refusal"] is None, kind
        assert lease_lock(db, other, kind, item, token) == dict.fromkeys(stale, None) | {"refusal": "NOT_FOUND"}
    # The entry points of both kinds answer LEASE_LOST for a stale token and change nothing.
    ex, (file, token), (deletion, d_token), stale = held.ex, held.item("file"), held.item("deletion"), uuid.uuid4()
    assert ex.heartbeat(file, stale) == "LEASE_LOST"
    assert ex.fail(file, stale, retryable=True)[0] == "LEASE_LOST"
    assert ex.release(file, stale) == "LEASE_LOST"
    assert deletion_heartbeat(ex, deletion, stale) == "LEASE_LOST"
    assert ex.call("SELECT outcome FROM dlw.executor_deletion_complete(%s, %s)", deletion, stale)[0]["outcome"] == (
        "LEASE_LOST"
    )
    assert deletion_fail(ex, deletion, stale) == "LEASE_LOST"
    assert (kind_row(owner, "deletion", deletion)["status"], kind_row(owner, "file", file)["status"]) == (
        "assigned",
        "assigned",
    )
    assert ex.heartbeat(file, token) == "ok" and deletion_heartbeat(ex, deletion, d_token) == "ok"


def test_the_one_sweep_requeues_expired_leases_of_both_kinds_then_fails_them_out_of_attempts(owner, held):
    ex, (file, token), (deletion, d_token) = held.ex, held.item("file"), held.item("deletion")
    expire(owner, "task_files", file)
    expire(owner, "task_deletions", deletion)
    counted = expiries(owner)

    # Attempts left: each kind's next claim takes its item back (a new token, attempt 2); the
    # first holder's token is lost. Only file expiries count for /metrics, as before.
    (again,) = ex.claim(1)
    assert (again["file_id"], again["attempts"], expiries(owner)) == (file, 2, counted + 1)
    (d_again,) = claim_deletions(ex, 1)
    assert (d_again["deletion_id"], d_again["attempts"], expiries(owner)) == (deletion, 2, counted + 1)
    assert ex.heartbeat(file, token) == "LEASE_LOST" and deletion_heartbeat(ex, deletion, d_token) == "LEASE_LOST"

    # Out of attempts: the next claim fails each item finally, as its kind fails (a file with its
    # task; a deletion with the task's deletion marker).
    expire(owner, "task_files", file, attempts=5)
    expire(owner, "task_deletions", deletion, attempts=5)
    assert ex.claim(1) == [] and claim_deletions(ex, 1) == []
    f, d = kind_row(owner, "file", file), kind_row(owner, "deletion", deletion)
    assert (f["status"], f["task"], d["status"], d["deletion"]) == ("failed", "failed", "failed", "failed")
    for row in (f, d):
        assert row["error"].startswith("lease expired on attempt 5 of 5 (last held by exec-1/test)"), row
    assert expiries(owner) == counted + 2


def test_the_one_failure_report_backs_off_both_kinds_then_fails_at_the_last_attempt(owner, held):
    ex, (file, token), (deletion, d_token) = held.ex, held.item("file"), held.item("deletion")
    assert ex.fail(file, token, retryable=True)[0] == "requeued"
    assert deletion_fail(ex, deletion, d_token) == "requeued"
    for table, item in (("task_files", file), ("task_deletions", deletion)):
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
    for table, item in (("task_files", file), ("task_deletions", deletion)):
        owner.execute(f"UPDATE dlw.{table} SET not_before = NULL, attempts = 4 WHERE id = %s", (item,))
    (f,) = ex.claim(1)
    (d,) = claim_deletions(ex, 1)
    assert ex.fail(f["file_id"], f["assignment_token"], retryable=True) == ("failed", "failed")
    assert deletion_fail(ex, d["deletion_id"], d["assignment_token"]) == "failed"
    assert [kind_row(owner, "file", file)["error"], kind_row(owner, "deletion", deletion)["error"]] == [
        "boom (attempt 5 of 5)",
        "root not served (attempt 5 of 5)",
    ]


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
