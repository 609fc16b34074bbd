"""Executors in SQL as the API's routes drive them: one dlw_app transaction per call with an
executor context (Executor), tasks made through dlw.create_task, and the fixtures the executor
tests share (owner, ex, and empty_queue, which cancels earlier tests' open work).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, as_tenant, tenant

SHA = "ab" * 32
FILE_COLUMNS = "status, attempts, assignment_token, lease_expires_at, executor_id, bytes_done, error"
# The owner connection the executor tests read rows with (the `owner` fixture: dict rows).
DictConnection = psycopg.Connection[dict[str, Any]]


def provision(db: MigratedDb, slug: str) -> int:
    return tenant(db, slug, **UNLIMITED)


def make_task(
    db: MigratedDb, tenant_id: int, files: int | list[dict[str, Any]] = 1, priority: int = 0, repo: str = "org/m"
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A task created through dlw.create_task as an operator; returns it and its file ids (by path)."""
    specs = files if isinstance(files, list) else [{"path": f"f{i:03d}", "size": 10} for i in range(files)]
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tenant_id, "tenant_operator", user="op")
        outcome, task = cast(
            tuple[Any, ...],
            conn.execute(
                "SELECT outcome, task_id FROM dlw.create_task(NULL, 'default', %s, 'main', %s, %s)",
                (repo, priority, Jsonb(specs)),
            ).fetchone(),
        )
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
        return cast(str, self.call("SELECT * FROM dlw.executor_heartbeat(%s, %s, %s)", file, token, done)[0]["outcome"])

    def complete(self, file: uuid.UUID, token: uuid.UUID | None, size: int = 10, sha: str = SHA) -> tuple[str, str]:
        row = self.call("SELECT * FROM dlw.executor_complete(%s, %s, %s, %s)", file, token, size, sha)[0]
        return row["outcome"], row["task_status"]

    def fail(self, file: uuid.UUID, token: uuid.UUID | None, retryable: bool, attempts: int = 5) -> tuple[str, str]:
        row = self.call("SELECT * FROM dlw.executor_fail(%s, %s, 'boom', %s, %s)", file, token, retryable, attempts)[0]
        return row["outcome"], row["task_status"]

    def release(self, file: uuid.UUID, token: uuid.UUID | None) -> str:
        return cast(str, self.call("SELECT dlw.executor_release(%s, %s) AS outcome", file, token)[0]["outcome"])

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def owner(db: MigratedDb) -> Iterator[DictConnection]:
    with db.owner() as conn:
        conn.row_factory = dict_row  # type: ignore[assignment]
        yield cast(DictConnection, conn)


@pytest.fixture
def ex(db: MigratedDb) -> Iterator[Executor]:
    executor = Executor(db)
    yield executor
    executor.close()


def cancel_open_work(owner: DictConnection) -> None:
    """No claimable file left: earlier tests' unfinished files and tasks are cancelled."""
    owner.execute(
        "UPDATE dlw.task_files SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL"
        " WHERE status IN ('pending', 'assigned', 'running')"
    )
    owner.execute("UPDATE dlw.tasks SET status = 'cancelled' WHERE status IN ('pending', 'running')")


@pytest.fixture(autouse=True)
def empty_queue(owner: DictConnection) -> None:
    """Each test starts with no claimable file: earlier tests' leftovers are cancelled."""
    cancel_open_work(owner)


def file_row(owner: DictConnection, file: uuid.UUID) -> dict[str, Any]:
    return cast(
        dict[str, Any], owner.execute(f"SELECT {FILE_COLUMNS} FROM dlw.task_files WHERE id = %s", (file,)).fetchone()
    )


def backoff_over(owner: DictConnection, file: uuid.UUID) -> None:
    """The file's backoff after a retryable failure has passed (set in the past, not slept)."""
    owner.execute("UPDATE dlw.task_files SET not_before = created_at WHERE id = %s", (file,))


def task_status(owner: DictConnection, task: uuid.UUID) -> str:
    row = cast(dict[str, Any], owner.execute("SELECT status FROM dlw.tasks WHERE id = %s", (task,)).fetchone())
    return str(row["status"])


def usage(owner: DictConnection, task: uuid.UUID) -> list[tuple[str, int]]:
    rows = owner.execute(
        "SELECT event_key, amount FROM dlw.usage_records WHERE task_id = %s ORDER BY event_key", (task,)
    )
    return [(r["event_key"], r["amount"]) for r in rows]
