"""The task and file state machines, enforced by triggers whoever writes (superuser included),
and dlw.cancel_task() driven as the API's role."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, as_tenant, tenant

TASK_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
FILE_STATUSES = ("pending", "assigned", "running", "succeeded", "failed", "cancelled")
TERMINAL = {"succeeded", "failed", "cancelled"}
TASK_LEGAL = {
    ("pending", "running"),
    ("pending", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("failed", "pending"),  # a retry (dlw.retry_task)
}
FILE_LEGAL = {
    ("pending", "assigned"),
    ("assigned", "pending"),
    ("assigned", "running"),
    ("running", "pending"),
    ("assigned", "succeeded"),
    ("running", "succeeded"),
    ("assigned", "failed"),
    ("running", "failed"),
    ("pending", "cancelled"),
    ("assigned", "cancelled"),
    ("running", "cancelled"),
    # A retried task's files: legal only while the task is pending, as it is in test_file_transition
    # (test_a_file_leaves_a_terminal_status_only_under_a_retried_task covers the rest).
    ("failed", "pending"),
    ("cancelled", "pending"),
}
# A legal way to reach each status from pending.
TASK_PATH = {
    "pending": [],
    "running": ["running"],
    "succeeded": ["running", "succeeded"],
    "failed": ["running", "failed"],
    "cancelled": ["cancelled"],
}
FILE_PATH = {
    "pending": [],
    "assigned": ["assigned"],
    "running": ["assigned", "running"],
    "succeeded": ["assigned", "running", "succeeded"],
    "failed": ["assigned", "failed"],
    "cancelled": ["cancelled"],
}


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> tuple[int, int]:
    return tenant(db, "states-a", name="A", **UNLIMITED), tenant(db, "states-b", name="B", **UNLIMITED)


@pytest.fixture(scope="module")
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    """The superuser: bypasses row-level security, but not the triggers."""
    with db.owner() as conn:
        yield conn


def new_task(owner: psycopg.Connection, tenant_id: int, files: int = 1) -> tuple[uuid.UUID, list[uuid.UUID]]:
    task = owner.execute(
        "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
        " SELECT %s, (SELECT id FROM dlw.projects WHERE tenant_id = %s AND is_default),"
        " (SELECT id FROM dlw.storage_targets WHERE tenant_id = %s AND name = 'default'), 'org/m', 'main'"
        " RETURNING id",
        (tenant_id, tenant_id, tenant_id),
    ).fetchone()[0]
    file_ids = [
        owner.execute(
            "INSERT INTO dlw.task_files (tenant_id, task_id, path, size) VALUES (%s, %s, %s, 1) RETURNING id",
            (tenant_id, task, f"f{i}"),
        ).fetchone()[0]
        for i in range(files)
    ]
    return task, file_ids


def set_task(owner: psycopg.Connection, task: uuid.UUID, status: str) -> None:
    owner.execute("UPDATE dlw.tasks SET status = %s WHERE id = %s", (status, task))


def set_file(owner: psycopg.Connection, file_id: uuid.UUID, status: str, **extra: Any) -> None:
    owner.execute(
        "UPDATE dlw.task_files SET status = %s, assignment_token = coalesce(%s, assignment_token),"
        " lease_expires_at = coalesce(%s, lease_expires_at) WHERE id = %s",
        (status, extra.get("token"), extra.get("lease"), file_id),
    )


def row(owner: psycopg.Connection, query: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
    found = owner.execute(query, params).fetchone()
    assert found is not None
    return tuple(found)


# ------------------------------------------------------------------------------------------
# Transitions, as the superuser
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), list(itertools.product(TASK_STATUSES, TASK_STATUSES)))
def test_task_transition(owner, tenants, old, new):
    task, _ = new_task(owner, tenants[0], files=0)
    for step in TASK_PATH[old]:
        set_task(owner, task, step)
    if old == new or (old, new) in TASK_LEGAL:
        set_task(owner, task, new)
        status, finished = row(owner, "SELECT status, finished_at IS NOT NULL FROM dlw.tasks WHERE id = %s", (task,))
        assert (status, finished) == (new, new in TERMINAL)
    else:
        with pytest.raises(psycopg.Error) as exc_info:
            set_task(owner, task, new)
        assert exc_info.value.sqlstate == "DLW01"
        assert exc_info.value.diag.message_primary == f"illegal task transition: {old} -> {new}"
        assert row(owner, "SELECT status FROM dlw.tasks WHERE id = %s", (task,)) == (old,)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(FILE_STATUSES, FILE_STATUSES)))
def test_file_transition(owner, tenants, old, new):
    _, (file_id,) = new_task(owner, tenants[0])
    for step in FILE_PATH[old]:
        set_file(owner, file_id, step)
    if old == new or (old, new) in FILE_LEGAL:
        set_file(owner, file_id, new)
        status, finished = row(
            owner, "SELECT status, finished_at IS NOT NULL FROM dlw.task_files WHERE id = %s", (file_id,)
        )
        assert (status, finished) == (new, new in TERMINAL)
    else:
        with pytest.raises(psycopg.Error) as exc_info:
            set_file(owner, file_id, new)
        assert exc_info.value.sqlstate == "DLW01"
        assert exc_info.value.diag.message_primary == f"illegal file transition: {old} -> {new}"


@pytest.mark.parametrize("task_status", ["running", "failed", "cancelled"])
@pytest.mark.parametrize("old", ["failed", "cancelled"])
def test_a_file_leaves_a_terminal_status_only_under_a_retried_task(owner, tenants, task_status, old):
    task, (file_id,) = new_task(owner, tenants[0])
    for step in FILE_PATH[old]:
        set_file(owner, file_id, step)
    for step in TASK_PATH[task_status]:
        set_task(owner, task, step)
    with pytest.raises(psycopg.Error) as exc_info:
        set_file(owner, file_id, "pending")
    assert exc_info.value.sqlstate == "DLW01"
    assert exc_info.value.diag.message_primary == f"illegal file transition: {old} -> pending"
    if task_status == "failed":  # retried: the task first, then its files
        set_task(owner, task, "pending")
        set_file(owner, file_id, "pending")
        assert row(owner, "SELECT status, finished_at FROM dlw.task_files WHERE id = %s", (file_id,)) == (
            "pending",
            None,
        )


@pytest.mark.parametrize("status", TASK_STATUSES[1:])
def test_a_task_is_inserted_pending_only(owner, tenants, status):
    tid = tenants[0]
    with pytest.raises(psycopg.Error) as exc_info:
        owner.execute(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, status)"
            " SELECT %s, p.id, s.id, 'r', 'main', %s FROM dlw.projects p, dlw.storage_targets s"
            " WHERE p.tenant_id = %s AND s.tenant_id = %s",
            (tid, status, tid, tid),
        )
    assert exc_info.value.sqlstate == "DLW01"
    assert exc_info.value.diag.message_primary == f"illegal task transition: (insert) -> {status}"


@pytest.mark.parametrize("status", FILE_STATUSES[1:])
def test_a_file_is_inserted_pending_only(owner, tenants, status):
    task, _ = new_task(owner, tenants[0], files=0)
    with pytest.raises(psycopg.Error) as exc_info:
        owner.execute(
            "INSERT INTO dlw.task_files (tenant_id, task_id, path, size, status) VALUES (%s, %s, 'x', 1, %s)",
            (tenants[0], task, status),
        )
    assert exc_info.value.sqlstate == "DLW01"
    assert exc_info.value.diag.message_primary == f"illegal file transition: (insert) -> {status}"


def test_updates_stamp_updated_at_and_a_plain_update_keeps_finished_at(owner, tenants):
    task, _ = new_task(owner, tenants[0], files=0)
    owner.execute("UPDATE dlw.tasks SET updated_at = '2000-01-01' WHERE id = %s", (task,))
    assert row(owner, "SELECT updated_at > '2000-01-01' FROM dlw.tasks WHERE id = %s", (task,)) == (True,)
    set_task(owner, task, "running")
    set_task(owner, task, "failed")
    finished = row(owner, "SELECT finished_at FROM dlw.tasks WHERE id = %s", (task,))[0]
    owner.execute("UPDATE dlw.tasks SET error = 'disk full' WHERE id = %s", (task,))  # same status: allowed
    assert row(owner, "SELECT finished_at, error FROM dlw.tasks WHERE id = %s", (task,)) == (finished, "disk full")


def test_the_app_role_hits_the_same_wall(db, owner, tenants):
    task, _ = new_task(owner, tenants[0])
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenants[0], "tenant_admin", user="u")
        with pytest.raises(psycopg.Error) as exc_info:
            conn.execute("UPDATE dlw.tasks SET status = 'succeeded' WHERE id = %s", (task,))
        assert exc_info.value.sqlstate == "DLW01"


# ------------------------------------------------------------------------------------------
# dlw.cancel_task, as the API role
# ------------------------------------------------------------------------------------------


def cancel(db: MigratedDb, tenant_id: int | None, task: uuid.UUID, role: str = "tenant_operator") -> str:
    with psycopg.connect(db.app_url) as conn:
        if tenant_id is not None:
            as_tenant(conn, tenant_id, role, user="canceller")
        outcome = conn.execute("SELECT dlw.cancel_task(%s)", (task,)).fetchone()[0]
        conn.commit()
        return str(outcome)


def created_task(db: MigratedDb, tenant_id: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A task created through dlw.create_task, with four files."""
    files = [{"path": f"f{i}", "size": 1} for i in range(4)]
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenant_id, "tenant_operator", user="creator")
        outcome, task = conn.execute(
            "SELECT outcome, task_id FROM dlw.create_task(NULL, NULL, 'org/m', 'main', 0, %s)", (Jsonb(files),)
        ).fetchone()
        conn.commit()
    assert outcome == "created"
    with db.owner() as owner:
        ids = [r[0] for r in owner.execute("SELECT id FROM dlw.task_files WHERE task_id = %s ORDER BY path", (task,))]
    return task, ids


def test_cancel_a_pending_task(db, owner, tenants):
    task, files = created_task(db, tenants[0])
    set_file(owner, files[0], "assigned", token=uuid.uuid4(), lease="2100-01-01")
    assert cancel(db, tenants[0], task) == "cancelled"
    assert row(owner, "SELECT status, finished_at IS NOT NULL FROM dlw.tasks WHERE id = %s", (task,)) == (
        "cancelled",
        True,
    )
    assert owner.execute(
        "SELECT DISTINCT status, assignment_token, lease_expires_at, finished_at IS NOT NULL"
        " FROM dlw.task_files WHERE task_id = %s",
        (task,),
    ).fetchall() == [("cancelled", None, None, True)]
    assert row(
        owner,
        "SELECT actor, detail FROM dlw.audit_log WHERE action = 'task.cancelled' AND target = %s",
        (str(task),),
    ) == ("canceller", {"previous_status": "pending", "files_cancelled": 4})


def test_cancel_a_running_task_invalidates_its_leases_and_keeps_finished_files(db, owner, tenants):
    task, files = created_task(db, tenants[0])
    token_assigned, token_running = uuid.uuid4(), uuid.uuid4()
    set_task(owner, task, "running")
    set_file(owner, files[0], "assigned", token=token_assigned, lease="2100-01-01")
    set_file(owner, files[1], "assigned", token=token_running, lease="2100-01-01")
    set_file(owner, files[1], "running")
    set_file(owner, files[2], "assigned")
    set_file(owner, files[2], "succeeded")
    assert cancel(db, tenants[0], task) == "cancelled"
    got = owner.execute(
        "SELECT status, assignment_token IS NULL AND lease_expires_at IS NULL FROM dlw.task_files"
        " WHERE task_id = %s ORDER BY path",
        (task,),
    ).fetchall()
    assert got == [("cancelled", True), ("cancelled", True), ("succeeded", True), ("cancelled", True)]
    # the executor that held a lease can no longer report: its token matches nothing, and
    # even a write that ignores the token cannot leave the terminal state
    assert (
        owner.execute(
            "UPDATE dlw.task_files SET status = 'succeeded' WHERE id = %s AND assignment_token = %s",
            (files[1], token_running),
        ).rowcount
        == 0
    )
    with pytest.raises(psycopg.Error) as exc_info:
        set_file(owner, files[1], "succeeded")
    assert exc_info.value.sqlstate == "DLW01"
    assert row(owner, "SELECT detail FROM dlw.audit_log WHERE action = 'task.cancelled' AND target = %s", (str(task),))[
        0
    ] == {"previous_status": "running", "files_cancelled": 3}


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_cancel_of_a_terminal_task_changes_nothing(db, owner, tenants, terminal):
    task, _ = new_task(owner, tenants[0], files=0)
    for step in TASK_PATH[terminal]:
        set_task(owner, task, step)
    before = row(owner, "SELECT status, finished_at, updated_at FROM dlw.tasks WHERE id = %s", (task,))
    assert cancel(db, tenants[0], task) == "TASK_TERMINAL"
    assert row(owner, "SELECT status, finished_at, updated_at FROM dlw.tasks WHERE id = %s", (task,)) == before
    assert row(owner, "SELECT count(*) FROM dlw.audit_log WHERE target = %s", (str(task),)) == (0,)


def test_cancel_of_another_tenants_task_is_not_found(db, owner, tenants):
    a, b = tenants
    theirs, _ = created_task(db, b)
    assert cancel(db, a, theirs) == "NOT_FOUND"
    assert cancel(db, a, uuid.uuid4()) == "NOT_FOUND"
    assert row(owner, "SELECT status FROM dlw.tasks WHERE id = %s", (theirs,)) == ("pending",)
    assert row(owner, "SELECT count(*) FROM dlw.task_files WHERE task_id = %s AND status = 'pending'", (theirs,)) == (
        4,
    )


def test_cancel_is_refused_to_a_viewer_and_without_context(db, owner, tenants):
    task, _ = created_task(db, tenants[0])
    with pytest.raises(errors.InsufficientPrivilege):
        cancel(db, tenants[0], task, role="tenant_viewer")
    with pytest.raises(errors.InsufficientPrivilege):
        cancel(db, None, task)
    assert row(owner, "SELECT status FROM dlw.tasks WHERE id = %s", (task,)) == ("pending",)
