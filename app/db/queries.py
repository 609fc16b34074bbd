"""Named SQL queries kept in .sql files, in the style of procrastinate's queries.sql.

A file holds blocks, each starting with a line `-- name: <identifier>`; the block's text up to
the next such line is the query (asyncpg `$n` placeholders). Comment lines right after the name
line are its description and stay out of the query. The file is parsed once, at import of the
module that loads it, so a malformed file fails at startup rather than on a request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

_NAME_LINE = re.compile(r"^--\s*name:\s*(\S+)\s*$")


class Queries(Mapping[str, str]):
    """An immutable mapping of query name to SQL text, loaded from one file."""

    def __init__(self, queries: Mapping[str, str], source: str = "<queries>") -> None:
        self._queries = dict(queries)
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> Queries:
        return cls(parse(path.read_text(encoding="utf-8"), str(path)), str(path))

    def __getitem__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise KeyError(f"no query named {name!r} in {self.source}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)


def parse(text: str, source: str = "<queries>") -> dict[str, str]:
    """{name: sql} from the text of a queries file; refuses duplicates, bad names, empty blocks
    and text before the first name line."""
    queries: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []

    def close() -> None:
        if name is None:
            if any(line.strip() and not line.lstrip().startswith("--") for line in body):
                raise ValueError(f"{source}: SQL before the first '-- name:' line")
            return
        while body and (not body[-1].strip() or body[-1].lstrip().startswith("--")):
            body.pop()  # comments after a query introduce the next one
        sql = "\n".join(body).strip().removesuffix(";").rstrip()  # one statement; callers may append
        if not sql:
            raise ValueError(f"{source}: query {name!r} is empty")
        queries[name] = sql

    for line in text.splitlines():
        match = _NAME_LINE.match(line)
        if match is None:
            if not (body == [] and line.lstrip().startswith("--")):  # the description comment
                body.append(line)
            continue
        close()
        name, body = match.group(1), []
        if not name.isidentifier():
            raise ValueError(f"{source}: query name {name!r} is not an identifier")
        if name in queries:
            raise ValueError(f"{source}: query {name!r} is defined twice")
    close()
    return queries


# The API's queries. Only app/api and app/db use them; other callers load their own file.
SQL = Queries.from_file(Path(__file__).with_name("queries.sql"))
