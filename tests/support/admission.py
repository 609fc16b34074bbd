"""Quota admission driven as the API's role (dlw.create_task, "insert-then-lock").

Each simulated request is one dlw_app transaction: dlw.set_context(), dlw.create_task(), commit.
Concurrency uses real threads, each with its own connection, released together by a barrier.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

CREATE_SQL = "SELECT outcome, task_id, metric, detail FROM dlw.create_task(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
FILES = [{"path": "config.json", "size": 10}, {"path": "model.safetensors", "size": 90, "sha256": "ab" * 32}]


def provision(db: MigratedDb, slug: str, concurrent: int = 10, bytes_month: int = 0) -> int:
    return tenant(db, slug, name=slug.title(), concurrent=concurrent, bytes_month=bytes_month, storage_gb=100)


def create(
    conn: psycopg.Connection,
    tenant_id: int,
    *,
    role: str = "tenant_operator",
    files: list[dict[str, Any]] | None = None,
    key: str | None = None,
    request_hash: bytes | None = None,
    lock_timeout_ms: int | None = 5000,
    project: uuid.UUID | None = None,
    target: str | None = "default",
    commit: bool = True,
    repo: str = "org/model",
) -> tuple[str, uuid.UUID | None, str | None, dict[str, Any] | None]:
    """One API request: set the context, create, commit (unless told not to)."""
    as_tenant(conn, tenant_id, role, user="user-1")
    row = conn.execute(
        CREATE_SQL,
        (
            project,
            target,
            repo,
            "main",
            0,
            Jsonb(FILES if files is None else files),
            key,
            request_hash if request_hash is not None else (b"h" if key else None),
            lock_timeout_ms,
        ),
    ).fetchone()
    assert row is not None
    if commit:
        conn.commit()
    return row[0], row[1], row[2], row[3]


def concurrently(db: MigratedDb, jobs: list[Callable[[psycopg.Connection], Any]]) -> list[Any]:
    """Run each job in its own thread and dlw_app connection; connections are opened first and
    the jobs released together. Returns each job's result or the exception it raised."""
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs), timeout=60)

    def worker(i: int) -> None:
        try:
            with psycopg.connect(db.app_url) as conn:
                barrier.wait()
                results[i] = jobs[i](conn)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return results


def scalar(db: MigratedDb, query: str, params: tuple[Any, ...] = ()) -> Any:
    with db.owner() as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def live_tasks(db: MigratedDb, tenant_id: int) -> int:
    return int(
        scalar(
            db,
            "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s AND status IN ('pending', 'running')",
            (tenant_id,),
        )
    )


def audit_count(db: MigratedDb, tenant_id: int, action: str) -> int:
    """How many times the action was audited (a repeat row stands for `count` occurrences)."""
    return int(
        scalar(
            db,
            "SELECT coalesce(sum(count), 0) FROM dlw.audit_log WHERE tenant_id = %s AND action = %s",
            (tenant_id, action),
        )
    )


def max_parallel(db: MigratedDb, wanted: int) -> int:
    """How many client connections the server can take at once, keeping a margin."""
    max_conn = int(scalar(db, "SHOW max_connections"))
    return min(wanted, max_conn - 30)


def one_file(size: int) -> list[dict[str, Any]]:
    return [{"path": f"blob-{uuid.uuid4().hex}", "size": size}]


def add_usage(db: MigratedDb, tenant_id: int, amount: int, occurred_at_sql: str) -> None:
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, occurred_at)"
            f" VALUES (%s, 'bytes_month', %s, %s, {occurred_at_sql})",
            (tenant_id, amount, f"evt:{uuid.uuid4()}"),
        )
