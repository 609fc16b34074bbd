"""A DBA for the psql tests: a login that is a member of dlw_admin and nothing else (the module
fixture `dba`, dropped with every login it made afterwards), and the owner-side reads those
tests check the DBA functions with (audit rows, tenant ids, whether a role exists).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.database import MigratedDb
from tests.support.psql import ok, psql, sqlstates
from tests.support.tenants import create_dba_login, drop_login

PASSWORD = secrets.token_urlsafe(16)


class Dba:
    """A DBA login for this module: LOGIN, member of dlw_admin, no other attribute."""

    def __init__(self, db: MigratedDb) -> None:
        self.db = db
        self.login = f"dba_{secrets.token_hex(4)}"
        self.url = db.url(self.login, PASSWORD)
        self.logins: list[str] = [self.login]

    def run(self, script: str) -> str:
        return ok(self.url, script)

    def fails(self, script: str) -> str:
        """The SQLSTATE of a script that must fail."""
        result = psql(self.url, script)
        assert result.returncode == 3, result.stdout + result.stderr
        codes = sqlstates(result.stderr)
        assert len(codes) == 1, result.stderr
        return codes[0]

    def new_login(self, prefix: str) -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.logins.append(name)
        return name


@pytest.fixture(scope="module")
def dba(db: MigratedDb) -> Iterator[Dba]:
    d = Dba(db)
    create_dba_login(db, d.login, PASSWORD)
    yield d
    for login in reversed(d.logins):
        drop_login(db, login)


def audit_rows(db: MigratedDb, tenant: str, action: str | None = None) -> list[tuple[Any, ...]]:
    with db.owner() as conn:
        return conn.execute(
            "SELECT a.actor, a.action, a.target, a.detail FROM dlw.audit_log a JOIN dlw.tenants t USING (tenant_id)"
            " WHERE t.slug = %s AND (%s::text IS NULL OR a.action = %s) ORDER BY a.at, a.id",
            (tenant, action, action),
        ).fetchall()


def tenant_id(db: MigratedDb, slug: str) -> int:
    with db.owner() as conn:
        row = conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug = %s", (slug,)).fetchone()
    assert row is not None, f"no tenant {slug}"
    return int(row[0])


def role_exists(db: MigratedDb, name: str) -> bool:
    with db.owner() as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None
