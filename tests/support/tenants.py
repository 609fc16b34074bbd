"""Test data: tenants with at least one row in every tenant table, written as the owner."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict

import psycopg
from psycopg import sql

from tests.support.database import MigratedDb

TENANT_TABLES_SQL = """
    SELECT c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'dlw' AND c.relkind IN ('r', 'p')
      AND EXISTS (SELECT 1 FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
    ORDER BY 1"""


# Quotas of 0 mean unlimited: for tests about something other than admission.
class Quotas(TypedDict):
    concurrent: int
    bytes_month: int
    storage_gb: int


UNLIMITED: Quotas = {"concurrent": 0, "bytes_month": 0, "storage_gb": 0}


def tenant(
    db: MigratedDb,
    slug: str,
    *,
    name: str | None = None,
    concurrent: int | None = None,
    bytes_month: int | None = None,
    storage_gb: int | None = None,
) -> int:
    """A tenant (with its default project and storage target) created as the owner; quotas left
    None take the database's defaults, 0 means unlimited. Returns its id."""
    with db.owner() as conn:
        row = conn.execute(
            "SELECT dlw.provision_tenant(%s, %s, %s, %s, %s)",
            (slug, slug if name is None else name, concurrent, bytes_month, storage_gb),
        ).fetchone()
    assert row is not None
    return int(row[0])


def as_tenant(
    conn: psycopg.Connection[Any], tenant: int | SeededTenant, role: str = "tenant_operator", *, user: str = "test-user"
) -> None:
    """Act for a tenant in the connection's current transaction, exactly as the API's request
    transaction does first: dlw.set_context(tenant, user, acting role), transaction-local."""
    tenant_id = tenant if isinstance(tenant, int) else tenant.tenant_id
    conn.execute("SELECT dlw.set_context(%s, %s, %s)", (tenant_id, user, role))


def tenant_tables(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(TENANT_TABLES_SQL).fetchall()]


@dataclass
class SeededTenant:
    tenant_id: int
    slug: str
    ids: dict[str, Any] = field(default_factory=dict)
    login: str = ""
    password: str = ""


def seed_tenant(db: MigratedDb, slug: str, *, reporting_login: bool = True) -> SeededTenant:
    """A tenant with one row in each tenant table (and a reporting login mapped to it)."""
    tid = tenant(db, slug, name=slug.title())
    t = SeededTenant(tid, slug)
    with db.owner() as conn:

        def q(query: str | sql.Composable, params: tuple[Any, ...] = ()) -> Any:
            """The first column of the statement's first row, if it returns rows."""
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            row = cur.fetchone() if cur.description else None
            return None if row is None else row[0]

        t.ids["project"] = q("SELECT id FROM dlw.projects WHERE tenant_id = %s", (tid,))
        t.ids["storage_target"] = q("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (tid,))
        # a config reporting must never read (a root is the tenant's layout of its disks)
        q(
            "UPDATE dlw.storage_targets SET config = jsonb_build_object('root', %s::text) WHERE tenant_id = %s",
            (f"/srv/dlw-seed/{slug}", tid),
        )
        t.ids["user"] = q(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, role)"
            " VALUES (%s, 'https://idp.test', %s, %s, 'tenant_admin') RETURNING id",
            (tid, f"{slug}-admin", f"admin@{slug}.test"),
        )
        t.ids["service_account"] = q(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, 'https://idp.test', %s, 'tenant_operator') RETURNING id",
            (tid, f"{slug}-robot"),
        )
        t.ids["task"] = q(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision,"
            " file_count, total_bytes) VALUES (%s, %s, %s, %s, 'main', 1, 10) RETURNING id",
            (tid, t.ids["project"], t.ids["storage_target"], f"{slug}/model"),
        )
        t.ids["task_file"] = q(
            "INSERT INTO dlw.task_files (tenant_id, task_id, path, size, assignment_token)"
            " VALUES (%s, %s, 'weights.bin', 10, gen_random_uuid()) RETURNING id",
            (tid, t.ids["task"]),
        )
        t.ids["task_deletion"] = q(
            # a failed deletion (claimable by nobody; a DELETE of the task queues it again)
            "INSERT INTO dlw.task_deletions (tenant_id, task_id, status, assignment_token, error)"
            " VALUES (%s, %s, 'failed', gen_random_uuid(), 'seeded') RETURNING id",
            (tid, t.ids["task"]),
        )
        q(
            "INSERT INTO dlw.idempotency_keys (tenant_id, key, request_hash, task_id) VALUES (%s, %s, '\\x00', %s)",
            (tid, f"key-{slug}", t.ids["task"]),
        )
        q(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id)"
            " VALUES (%s, 'bytes_month', 10, %s, %s, %s)",
            (tid, f"file:{t.ids['task_file']}", t.ids["task"], t.ids["task_file"]),
        )
        q(
            "INSERT INTO dlw.quota_snapshots (tenant_id, period, metric, amount)"
            " VALUES (%s, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 'bytes_month', 10)",
            (tid,),
        )
        q("INSERT INTO dlw.audit_log (tenant_id, actor, action) VALUES (%s, 'seed', 'seeded')", (tid,))
        # The dedup registry and the storage counter (migrations/0026): the same content for
        # every seeded tenant, which must still be each tenant's own.
        q(
            "INSERT INTO dlw.stored_blobs (tenant_id, target_id, sha256, size, path)"
            " VALUES (%s, %s, repeat('ab', 32), 10, 'org/model/main/weights.bin')",
            (tid, t.ids["storage_target"]),
        )
        q("INSERT INTO dlw.storage_usage (tenant_id, folded, bytes) VALUES (%s, true, 10)", (tid,))
        # A stand-in ciphertext (the API seals real ones): the row is what isolation is about.
        q(
            "INSERT INTO dlw.hub_tokens (tenant_id, ciphertext) VALUES (%s, %s)",
            (tid, b"\x01" + secrets.token_bytes(40)),
        )
        if reporting_login:
            t.login = f"rep_{slug}_{secrets.token_hex(4)}"
            t.password = secrets.token_urlsafe(12)
            q(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE dlw_reporting").format(
                    sql.Identifier(t.login), sql.Literal(t.password)
                )
            )
            q("INSERT INTO dlw.reporting_logins (tenant_id, login) VALUES (%s, %s)", (tid, t.login))
            apply_login_limits(conn, t.login)
        return t


@contextmanager
def seeded_tenants(db: MigratedDb, *slugs: str) -> Iterator[list[SeededTenant]]:
    """seed_tenant() for each slug; their reporting logins (cluster-wide roles) dropped after."""
    seeded = [seed_tenant(db, slug) for slug in slugs]
    try:
        yield seeded
    finally:
        for t in seeded:
            drop_login(db, t.login)


def apply_login_limits(conn: psycopg.Connection, login: str) -> None:
    """As a superuser: give a login mapped by hand the limits of its dlw.reporting_logins row,
    as docs/dba.md tells a superuser to (dlw_admin.create_reporting_login does it itself)."""
    row = conn.execute(
        "SELECT connection_limit, statement_timeout_ms, idle_in_transaction_timeout_ms, temp_file_limit_kb"
        " FROM dlw.reporting_logins WHERE login = %s",
        (login,),
    ).fetchone()
    assert row is not None, login
    role = sql.Identifier(login)
    conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(role, sql.Literal(row[0])))
    for name, value in zip(
        ("statement_timeout", "idle_in_transaction_session_timeout", "temp_file_limit"), row[1:], strict=True
    ):
        conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(role, sql.Identifier(name), sql.Literal(value)))


def drop_login(db: MigratedDb, login: str) -> None:
    db.server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))


def create_dba_login(db: MigratedDb, login: str, password: str) -> str:
    """A DBA's login as docs/dba.md makes it (LOGIN, a member of dlw_admin, nothing else),
    created by the server's superuser. Returns its URL; drop_login drops it."""
    db.server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE dlw_admin").format(
            sql.Identifier(login), sql.Literal(password)
        )
    )
    return db.url(login, password)


@contextmanager
def dba_login(db: MigratedDb) -> Iterator[str]:
    """A new DBA login (create_dba_login) for the block: its URL. Dropped after."""
    login = f"dba_{secrets.token_hex(4)}"
    url = create_dba_login(db, login, secrets.token_urlsafe(16))
    try:
        yield url
    finally:
        drop_login(db, login)
