"""The rules of the policy: the built-in file (policy.csv) plus the rows of dlw.casbin_rule, as
(ptype, field, ...) tuples for app/authz/policy_index.py. Read-only: grants are written in SQL by
a DBA; the trigger on the table bumps dlw.grant_version, records the changed rules and notifies,
and each instance applies them (app/authz/authorizer.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import asyncpg

from app.authz.policy_index import Rule
from app.db.queries import SQL

POLICY_FILE = Path(__file__).with_name("policy.csv")
FIELDS = ("ptype", "v0", "v1", "v2", "v3", "v4", "v5")


def rule_of(fields: Sequence[str | None]) -> Rule:
    """A rule of a policy line's fields, as casbin's loader reads them: each stripped, empty
    ones dropped."""
    return tuple(s for f in fields if f is not None and (s := f.strip()) != "")


def row_rule(row: asyncpg.Record) -> Rule:
    """The rule of a dlw.casbin_rule (or dlw.casbin_rule_changes) row."""
    return rule_of([row[f] for f in FIELDS])


def file_rules() -> list[Rule]:
    """The rules of the built-in policy file, in its order."""
    rules = []
    for raw in POLICY_FILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append(rule_of(line.split(",")))
    return rules


async def table_rules(pool: asyncpg.Pool) -> list[Rule]:
    """Every rule of dlw.casbin_rule, in order (a full load: only after a gap or a reconnect)."""
    return [row_rule(row) for row in await pool.fetch(SQL["casbin_grants"])]
