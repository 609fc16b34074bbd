"""Named queries of the command-line tools, from app/ops/queries.sql, read with the one loader
the API uses (app/db/queries.py), so the format has one parser."""

from __future__ import annotations

from pathlib import Path

from app.db.queries import Queries

QUERY_FILE = Path(__file__).with_name("queries.sql")
OPS_SQL = Queries.from_file(QUERY_FILE)


def query(name: str) -> str:
    """The SQL text of a named query; KeyError for an unknown name (a programming error)."""
    return OPS_SQL[name]
