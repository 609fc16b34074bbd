"""`dlw doctor --citus`: the real schema stays distributable by tenant_id; a table that would not
distribute (in a scratch database) fails it, through the CLI too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.ops.citus_check import GLOBAL_TABLES, KNOWN_OBSTACLES, distributable_problems, distribution_plan
from tests.support.database import MigratedDb, PgServer, create_database, drop_database
from tests.support.tenants import tenant_tables


def _doctor(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "doctor", "--citus", "--database-url", url], capture_output=True, text=True
    )


def test_the_migrated_schema_is_distributable(db: MigratedDb):
    assert distributable_problems(db.owner_url) == []
    plan = dict(distribution_plan(db.owner_url))
    with db.owner() as conn:
        with_tenant_id = {f"dlw.{name}" for name in tenant_tables(conn)}
    # Every table is placed: the tenant tables distributed, every other one listed with a reason.
    assert {name for name, how in plan.items() if how == "distributed by tenant_id"} == with_tenant_id - set(
        GLOBAL_TABLES
    )
    assert {name for name, how in plan.items() if how != "distributed by tenant_id"} <= set(GLOBAL_TABLES)
    assert "dlw.tasks" in with_tenant_id and plan["dlw.tenants"] == GLOBAL_TABLES["dlw.tenants"]
    cli = _doctor(db.owner_url)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "distributable" in cli.stdout and "dlw.task_files: distributed by tenant_id" in cli.stdout


TENANT_TABLE = "CREATE TABLE dlw.broken (tenant_id bigint NOT NULL REFERENCES dlw.tenants, id bigint NOT NULL"


@pytest.mark.parametrize(
    "statement, expected",
    [
        (
            TENANT_TABLE + ", PRIMARY KEY (id))",
            "primary key, unique key or unique index of a tenant table without tenant_id: dlw.broken (broken_pkey)",
        ),
        (
            TENANT_TABLE + ", code text, PRIMARY KEY (tenant_id, id), UNIQUE (code))",
            "primary key, unique key or unique index of a tenant table without tenant_id: dlw.broken (broken_code_key)",
        ),
        (
            TENANT_TABLE + ", PRIMARY KEY (tenant_id, id)); CREATE UNIQUE INDEX broken_by_id ON dlw.broken (id)",
            "primary key, unique key or unique index of a tenant table without tenant_id: dlw.broken (broken_by_id)",
        ),
        (TENANT_TABLE + ")", "tenant table without a primary key: dlw.broken"),
        (
            # another tenant's task: the key pairs a column with tasks.tenant_id, not broken.tenant_id
            TENANT_TABLE + ", task_tenant bigint, task_id uuid, PRIMARY KEY (tenant_id, id),"
            " FOREIGN KEY (task_tenant, task_id) REFERENCES dlw.tasks (tenant_id, id))",
            "foreign key between tenant tables that does not pair tenant_id:"
            " dlw.broken (broken_task_tenant_task_id_fkey -> dlw.tasks)",
        ),
        (
            "CREATE TABLE dlw.unlisted (id bigint PRIMARY KEY)",
            "table without tenant_id that is not listed as global: dlw.unlisted",
        ),
        (
            "ALTER TABLE dlw.snapshot_state ADD COLUMN task_tenant bigint, ADD COLUMN task_id uuid,"
            " ADD FOREIGN KEY (task_tenant, task_id) REFERENCES dlw.tasks (tenant_id, id)",
            "foreign key from a global table to a tenant table (a reference table cannot reference a distributed one):"
            " dlw.snapshot_state (snapshot_state_task_tenant_task_id_fkey -> dlw.tasks)",
        ),
        ("DROP INDEX dlw.users_identity", "known obstacle no longer found"),
    ],
    ids=["pk", "unique", "unique-index", "no-pk", "fk", "unlisted-global", "global-to-tenant-fk", "stale-known"],
)
def test_a_table_that_would_not_distribute_fails(pg_server: PgServer, statement: str, expected: str):
    scratch = create_database(pg_server, "citus_broken")
    try:
        with scratch.owner() as conn:
            conn.execute(statement)
        problems = distributable_problems(scratch.owner_url)
        assert any(line.startswith(expected) for line in problems), problems
        cli = _doctor(scratch.owner_url)
        assert cli.returncode == 1 and expected in cli.stdout, cli.stdout + cli.stderr
    finally:
        drop_database(scratch)


def test_known_obstacles_say_what_the_move_changes():
    assert all(len(plan) > 40 for plan in KNOWN_OBSTACLES.values())
