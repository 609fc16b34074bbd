"""A small async casbin adapter on the asyncpg pool: the built-in policy file plus the rows
of dlw.casbin_rule. It is read-only: grants are written in SQL by a DBA; the trigger on the
table bumps dlw.grant_version and notifies, and each instance reloads when the version moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
from casbin.persist.adapter import load_policy_line
from casbin.persist.adapters.asyncio import AsyncAdapter

from app.db.queries import SQL

POLICY_FILE = Path(__file__).with_name("policy.csv")


class ReadOnlyPolicy(PermissionError):
    pass


def _line(fields: list[str]) -> str:
    return ", ".join(f for f in fields if f != "")


def rule_of(fields: list[str]) -> tuple[str, list[str]]:
    """(ptype, rule) of a policy line's fields, as load_policy_line reads them (empty fields dropped)."""
    ptype, *rest = [f for f in fields if f != ""]
    return ptype, rest


def file_rules() -> set[tuple[str, ...]]:
    """The rules of the built-in policy file, as (ptype, *rule)."""
    rules = set()
    for raw in POLICY_FILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.add(tuple(f.strip() for f in line.split(",")))
    return rules


class PgPolicyAdapter(AsyncAdapter):  # type: ignore[misc]
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load_policy(self, model: Any) -> None:
        for raw in POLICY_FILE.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                load_policy_line(line, model)
        rows = await self.pool.fetch(SQL["casbin_grants"])
        for row in rows:
            load_policy_line(
                _line([row["ptype"], row["v0"], row["v1"], row["v2"], row["v3"], row["v4"], row["v5"]]), model
            )

    async def _read_only(self, *args: Any) -> None:
        raise ReadOnlyPolicy("policy rows are written with SQL into dlw.casbin_rule; the API only reads them")

    save_policy = add_policy = remove_policy = remove_filtered_policy = _read_only
