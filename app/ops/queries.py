"""Named queries of the command-line tools, from app/ops/queries.sql.

A block starts at a `-- name: <name>` line and runs to the next one; comment lines before a
name line belong to no query. Kept in one file so each statement is written once."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

QUERY_FILE = Path(__file__).with_name("queries.sql")
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")


def parse(text: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def close() -> None:
        if name is not None:
            body = [line for line in lines if not line.lstrip().startswith("--")]
            queries[name] = "\n".join(body).strip().rstrip(";").strip()

    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            close()
            name, lines = match.group(1), []
            if name in queries:
                raise ValueError(f"{QUERY_FILE.name}: query {name!r} defined twice")
        else:
            lines.append(line)
    close()
    return queries


@cache
def _all() -> dict[str, str]:
    return parse(QUERY_FILE.read_text())


def query(name: str) -> str:
    """The SQL text of a named query; KeyError for an unknown name (a programming error)."""
    return _all()[name]
