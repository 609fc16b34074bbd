"""One rule for a stored path (migrations/0032): dlw.stored_path_ok is what both constraints
(task_files_stored_path, stored_blobs_path) check and what the completion's 22023 check calls,
and the API's schema (app/api/routes/executor.py, which refuses a bad path with 422 before the
database sees it) is fed the same samples here and must agree with it on every one."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from pydantic import BaseModel, ValidationError

from app.api.routes.executor import CompleteBody
from app.api.routes.executor_batch import FileCompletion
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

GOOD = [
    "a",
    "a.bin",
    "org/m/main/w.bin",
    "models--org--m/snapshots/0123abc/sub/w.bin",
    "...",
    ".a",
    "..a",
    "a.",
    "a..",
    "a/.hidden/b",
    "spaces are fine/and ünïcödé/文件",
    "é" * 4096,  # the limit counts characters, not bytes, on both sides
    "/".join(["ab"] * 1365) + "cd",  # 4096 characters, many segments
]
BAD = [
    "",
    "/a",
    "a/",
    "a//b",
    ".",
    "..",
    "./a",
    "a/.",
    "a/./b",
    "../a",
    "a/..",
    "a/../b",
    "x" * 4097,
    "é" * 4097,
    "a\x01b",
    "a\tb",
    "a\nb",
    "a\x1fb",
    "a\x7fb",
    "a\x80b",
    "a\x85b",
    "a\x9fb",
]


def api_accepts(model: type[BaseModel], path: str) -> bool:
    """Whether the route's body schema takes the path, from JSON as the API receives it."""
    body = {"assignment_token": str(uuid.uuid4()), "bytes": 1, "sha256": "ab" * 32, "stored_path": path}
    if model is FileCompletion:  # an item of POST /executor/reports names its file
        body["file_id"] = str(uuid.uuid4())
    try:
        model.model_validate_json(json.dumps(body))
    except ValidationError:
        return False
    return True


def sql_accepts(conn: psycopg.Connection, path: str) -> bool:
    row = conn.execute("SELECT dlw.stored_path_ok(%s)", (path,)).fetchone()
    assert row is not None and row[0] is not None
    return bool(row[0])


@pytest.mark.parametrize("model", [CompleteBody, FileCompletion])
def test_the_api_schema_agrees_with_the_database_rule_on_every_sample(db: MigratedDb, model: type[BaseModel]):
    assert all(len(p) <= 4096 for p in GOOD) and len(GOOD[-1]) == 4096
    with psycopg.connect(db.app_url) as conn:
        verdicts = {p: (sql_accepts(conn, p), api_accepts(model, p)) for p in GOOD + BAD}
    assert {p: v for p, v in verdicts.items() if v[0] != v[1]} == {}
    assert [p for p in GOOD if not verdicts[p][0]] == []
    assert [p for p in BAD if verdicts[p][0]] == []
    # A NUL cannot reach the database (text holds none); the API refuses it.
    assert not api_accepts(model, "a\x00b")


def test_both_constraints_and_the_completion_check_use_the_one_rule(db: MigratedDb):
    with db.owner() as conn:
        defs = dict(
            conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conname IN ('task_files_stored_path', 'stored_blobs_path')"
            ).fetchall()
        )
        assert defs == {
            "task_files_stored_path": "CHECK (dlw.stored_path_ok(stored_path))",
            "stored_blobs_path": "CHECK (dlw.stored_path_ok(path))",
        }
        src = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = 'dlw.executor_complete_set(jsonb)'::regprocedure"
        ).fetchone()[0]
        assert "dlw.stored_path_ok(" in src and "(^|/)" not in src
        # NULL (no path said) passes, as a CHECK passes it.
        assert conn.execute("SELECT dlw.stored_path_ok(NULL)").fetchone() == (None,)
    # The completion refuses a bad path with 22023 (the caller's error), before any lookup.
    with psycopg.connect(db.app_url) as conn:
        for path in ("a/../b", "/abs", "a\x85b"):
            with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
                as_tenant(conn, 0, "executor", user="x")
                conn.execute(
                    "SELECT * FROM dlw.executor_complete(gen_random_uuid(), gen_random_uuid(), 1, %s, %s)",
                    ("ab" * 32, path),
                )
