"""Registering stored contents as a set (sql/23_stored_blobs.sql): dlw.storage_record_set takes a
batch's contents in one statement, each once, in (tenant, target, sha256) order, and counts new
ones for storage; dlw.storage_record (one content) is the same code path; the set-based
completion (dlw.executor_complete_set) registers its batch through it."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.sql.test_task_deletions import Executor, make_task, owner, provision, quiet_queues
from tests.support.database import MigratedDb

__all__ = ["owner", "quiet_queues"]  # the executor tests' module fixtures, shared


def sha(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def target_of(conn: psycopg.Connection, tid: int) -> uuid.UUID:
    row = conn.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s AND name = 'default'", (tid,))
    return row.fetchone()["id"]  # type: ignore[index]


def registry(conn: psycopg.Connection, tid: int) -> dict[str, tuple[int, str | None]]:
    rows = conn.execute("SELECT sha256, size, path FROM dlw.stored_blobs WHERE tenant_id = %s", (tid,))
    return {r["sha256"]: (r["size"], r["path"]) for r in rows}


def changes(conn: psycopg.Connection, tid: int) -> list[int]:
    rows = conn.execute("SELECT bytes FROM dlw.storage_usage WHERE tenant_id = %s AND NOT folded ORDER BY id", (tid,))
    return [int(r["bytes"]) for r in rows]


def record_set(conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> int:
    conn.execute("SET ROLE dlw_system")
    try:
        (added,) = (
            conn.execute(
                "SELECT dlw.storage_record_set(%s::bigint[], %s::uuid[], %s::text[], %s::bigint[], %s::text[]) AS n",
                tuple(list(column) for column in zip(*rows, strict=True)),
            )
            .fetchone()
            .values()
        )
    finally:
        conn.execute("RESET ROLE")
    return int(added)


def test_a_set_registers_each_content_once_with_its_first_copy_and_counts_new_ones(db: MigratedDb, owner):
    tid, other = provision(db, "record-set"), provision(db, "record-set-other")
    mine, theirs = target_of(owner, tid), target_of(owner, other)
    a, b, c = sha("a"), sha("b"), sha("c")
    # Unsorted, a content twice (two files of one content in one batch), one without a path,
    # and another tenant's row in the same set.
    added = record_set(
        owner,
        [(tid, mine, b, 5, None), (tid, mine, a, 10, "z/a"), (other, theirs, a, 10, "o/a"), (tid, mine, a, 10, "m/a")],
    )
    assert added == 3
    assert registry(owner, tid) == {a: (10, "m/a"), b: (5, None)}
    assert registry(owner, other) == {a: (10, "o/a")}
    assert changes(owner, tid) == [15] and changes(owner, other) == [10]  # one change row per tenant

    # Again, with new and known contents: a known one keeps its copy (or takes one it lacked)
    # and counts nothing; only the new one counts.
    assert record_set(owner, [(tid, mine, c, 7, "c"), (tid, mine, b, 5, "b"), (tid, mine, a, 10, "a")]) == 1
    assert registry(owner, tid) == {a: (10, "m/a"), b: (5, "b"), c: (7, "c")}
    assert changes(owner, tid) == [15, 7]

    # One content: the same code path, answering whether it was new.
    owner.execute("SET ROLE dlw_system")
    try:
        one = "SELECT dlw.storage_record(%s, %s, %s, %s, %s) AS added"
        assert owner.execute(one, (tid, mine, sha("d"), 3, "d")).fetchone() == {"added": True}
        assert owner.execute(one, (tid, mine, sha("d"), 3, "d2")).fetchone() == {"added": False}
    finally:
        owner.execute("RESET ROLE")
    assert registry(owner, tid)[sha("d")] == (3, "d")
    assert changes(owner, tid) == [15, 7, 3]
    with psycopg.connect(db.app_url) as conn:
        for signature in (
            "dlw.storage_record_set(bigint[],uuid[],text[],bigint[],text[])",
            "dlw.storage_record(bigint,uuid,text,bigint,text)",
        ):
            row = conn.execute("SELECT has_function_privilege('dlw_app', %s, 'EXECUTE')", (signature,)).fetchone()
            assert row == (False,), signature


def test_a_batch_of_completions_registers_its_contents_in_one_set(db: MigratedDb, owner):
    tid = provision(db, "record-batch")
    same, alone = sha("same"), sha("alone")
    specs = [
        {"path": "one.bin", "size": 4, "sha256": same},
        {"path": "two.bin", "size": 4, "sha256": same},
        {"path": "three.bin", "size": 6, "sha256": alone},
    ]
    _, ids = make_task(db, tid, specs, repo="org/record-batch")
    ex = Executor(db, tid)
    try:
        claimed = {r["file_id"]: r for r in ex.claim(10)}
        assert set(claimed) == set(ids)
        items = [
            {
                "file_id": str(f),
                "assignment_token": str(claimed[f]["assignment_token"]),
                "bytes": claimed[f]["size"],
                "sha256": claimed[f]["sha256"],
                "stored_path": f"org/record-batch/main/{claimed[f]['path']}",
            }
            for f in reversed(ids)
        ]
        got = ex.call("SELECT * FROM dlw.executor_report_batch(%s, '[]')", Jsonb(items))
    finally:
        ex.close()
    assert sorted(r["outcome"] for r in got) == ["completed"] * 3
    # The shared content once, its copy the first in path order; storage counts 4 + 6 once, in
    # one change row; every file points at its blob.
    assert registry(owner, tid) == {
        same: (4, "org/record-batch/main/one.bin"),
        alone: (6, "org/record-batch/main/three.bin"),
    }
    assert changes(owner, tid) == [10]
    blobs = owner.execute("SELECT path, blob_sha256 FROM dlw.task_files WHERE tenant_id = %s ORDER BY path", (tid,))
    assert [(r["path"], r["blob_sha256"]) for r in blobs] == [
        ("one.bin", same),
        ("three.bin", alone),
        ("two.bin", same),
    ]
