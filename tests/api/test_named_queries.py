"""The server's SQL (app/api, app/authz, app/db) lives in app/db/queries.sql: every name there
is used, every used name exists, and no module writes SQL inline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.db.queries import SQL, parse

APP = Path(__file__).resolve().parents[2] / "app"
API_SOURCES = [path for sub in ("api", "authz", "db") for path in sorted((APP / sub).rglob("*.py"))]
SQL_WORDS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "WITH ")


def used_names() -> set[str]:
    names: set[str] = set()
    for path in API_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "SQL":
                assert isinstance(node.slice, ast.Constant), f"{path}: SQL[...] takes a literal name"
                names.add(node.slice.value)
    return names


def test_every_query_is_used_and_every_used_query_exists():
    used = used_names()
    assert used - set(SQL) == set(), "used but not in app/db/queries.sql"
    assert set(SQL) - used == set(), "in app/db/queries.sql but never used"


def test_no_inline_sql_in_the_api():
    for path in API_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.lstrip().upper().startswith(SQL_WORDS), f"{path}:{node.lineno}"


def test_the_parser():
    text = "-- header\n\n-- name: one\n-- what it does\nSELECT 1;\n\n-- about two\n-- name: two\nSELECT $1\n  FROM t;\n"
    assert parse(text) == {"one": "SELECT 1", "two": "SELECT $1\n  FROM t"}
    for bad in (
        "SELECT 1;\n-- name: one\nSELECT 1",
        "-- name: one\nSELECT 1\n-- name: one\nSELECT 2",
        "-- name: one\n-- only a comment\n",
        "-- name: not-an-identifier\nSELECT 1",
    ):
        with pytest.raises(ValueError):
            parse(bad)
