"""Incremental grant reload (issue 16): an instance applies only the rules changed since the
version it knows (dlw.casbin_rule_changes), and ends up with exactly the policy a full load gives;
it reloads everything only when those changes are no longer all recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from app.authz.authorizer import Authorizer
from app.identity.principal import Principal
from tests.support.database import MigratedDb

ASKS = [
    ("/api/v1/users", "GET"),
    ("/api/v1/tasks", "POST"),
    ("/api/v1/tasks", "GET"),
    ("/api/v1/audit", "GET"),
]
SUBJECTS = [f"inc-{i}" for i in range(6)]


@pytest.fixture
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    with db.owner() as conn:
        yield conn
        conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:inc-%'")


def decisions(authz: Authorizer) -> dict[tuple[str, str, str], str | None]:
    out = {}
    for subject in SUBJECTS:
        principal = Principal(user_id=subject, tenant_id=1, role="tenant_viewer")
        for obj, act in ASKS:
            out[subject, obj, act] = authz.acting_role(principal, obj, act, True)
    return out


async def _scenario(db: MigratedDb, owner: psycopg.Connection) -> None:
    pool = await asyncpg.create_pool(db.app_url, min_size=1, max_size=2)
    authz, fresh = Authorizer(pool), Authorizer(pool)
    try:
        await authz.reload()
        steps = [
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:inc-0', 'tenant_admin'),"
            " ('g', 'user:inc-1', 'tenant_operator'), ('g', 'user:inc-2', 'tenant_operator')",
            "DELETE FROM dlw.casbin_rule WHERE v0 = 'user:inc-1'",
            "UPDATE dlw.casbin_rule SET v1 = 'tenant_admin' WHERE v0 = 'user:inc-2'",
            # Added and removed between two checks: the instance applies the end state.
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:inc-3', 'tenant_admin')",
            "DELETE FROM dlw.casbin_rule WHERE v0 = 'user:inc-3'",
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:inc-4', 'tenant_operator')",
        ]
        for step in steps:
            owner.execute(step)
            if "inc-3" in step and step.startswith("INSERT"):
                continue  # no check in between
            assert await authz.refresh()
            await fresh.reload()
            assert decisions(authz) == decisions(fresh), step
        assert decisions(authz)["inc-0", "/api/v1/users", "GET"] == "tenant_admin"
        assert decisions(authz)["inc-1", "/api/v1/tasks", "POST"] is None
        assert decisions(authz)["inc-2", "/api/v1/users", "GET"] == "tenant_admin"
        assert decisions(authz)["inc-3", "/api/v1/users", "GET"] is None
        assert decisions(authz)["inc-4", "/api/v1/tasks", "POST"] == "tenant_operator"
        assert authz.full_reloads == 1, "every change above was applied incrementally"
        assert not await authz.refresh()  # nothing moved: nothing done

        # Changes no longer all recorded (pruned, or a TRUNCATE): a full reload, still exact.
        owner.execute("UPDATE dlw.grant_version SET changes_from = version + 2")
        owner.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:inc-5', 'tenant_admin')")
        assert await authz.refresh()
        assert authz.full_reloads == 2
        assert decisions(authz)["inc-5", "/api/v1/users", "GET"] == "tenant_admin"
    finally:
        await pool.close()


def test_changes_are_applied_incrementally_and_match_a_full_load(db: MigratedDb, owner: psycopg.Connection):
    asyncio.run(_scenario(db, owner))


def test_each_changing_statement_records_its_rules_under_its_version(db: MigratedDb, owner: psycopg.Connection):
    (before,) = owner.execute("SELECT version FROM dlw.grant_version").fetchone()
    owner.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:inc-0', 'tenant_admin')")
    owner.execute("UPDATE dlw.casbin_rule SET v1 = 'tenant_operator' WHERE v0 = 'user:inc-0'")
    rows = owner.execute(
        "SELECT version - %s, v0, v1 FROM dlw.casbin_rule_changes WHERE version > %s ORDER BY 1, 3", (before, before)
    ).fetchall()
    assert rows == [
        (1, "user:inc-0", "tenant_admin"),
        (2, "user:inc-0", "tenant_admin"),
        (2, "user:inc-0", "tenant_operator"),
    ]
