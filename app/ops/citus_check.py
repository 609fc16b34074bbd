"""`dlw doctor --citus`: the schema stays distributable by tenant_id (docs/scale-out.md).

Citus distributes a table by one column; a unique or primary key must contain it, and a foreign
key between two distributed tables must pair the distribution columns (both tables co-located).
A table without tenant_id becomes a reference table (a copy on every node): a distributed table
may reference it, it may not reference a distributed one. Each check is one query listing the
offenders; an empty result is a pass. Nothing here needs Citus installed: it reads the plain
PostgreSQL catalog, so it runs in the suite on every change.
"""

from __future__ import annotations

import psycopg

# The tables that are not distributed by tenant_id, each with why (they become Citus reference
# tables, or stay on the coordinator). Adding one here is a scale-out design decision.
GLOBAL_TABLES: dict[str, str] = {
    "dlw.tenants": "one row per tenant, read by every admission and joined by every tenant table's"
    " foreign key: a reference table (distributing it by its own key would forbid those foreign keys)",
    "dlw.casbin_rule": "the platform's authorization policy (roles and grants), loaded whole by every API"
    " instance: a reference table",
    "dlw.schema_program": "which sql/ program and migrations the database carries, read by /readyz:"
    " coordinator metadata, a reference table",
    "dlw.snapshot_state": "one row: when the usage fold last ran: a reference table",
    "dlw.grant_version": "one row: the authorization policy's version, bumped by grant changes: a reference table",
    "dlw.casbin_rule_changes": "the recent changes of the authorization policy (dlw.casbin_rule), read by every"
    " API instance to apply a change incrementally: a reference table like the policy itself",
    "dlw.reporting_logins": "maps a database login to its tenant before any tenant is known; logins are"
    " cluster-wide roles: a reference table",
}

# Obstacles known and accepted until the move, each with the change the move makes first
# (docs/scale-out.md, "Before distributing"). A new obstacle fails the check.
KNOWN_OBSTACLES: dict[str, str] = {
    "primary key, unique key or unique index of a tenant table without tenant_id: dlw.users (users_identity)": (
        "one OIDC identity (issuer, subject) belongs to one tenant platform-wide; Citus cannot enforce"
        " a uniqueness across shards, so the move first adds a reference table of identities"
        " (issuer, subject) -> tenant_id that carries it, and this index gains tenant_id"
    ),
}

_TABLES = """
    SELECT c.oid, format('%%I.%%I', n.nspname, c.relname) AS name,
           EXISTS (SELECT 1 FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
           AND NOT format('%%I.%%I', n.nspname, c.relname) = ANY (%(global)s) AS distributed,
           (SELECT a.attnum FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped) AS tenant_attnum
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'dlw' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"""

CHECKS: dict[str, str] = {
    "table without tenant_id that is not listed as global": f"""
        WITH t AS ({_TABLES})
        SELECT name FROM t WHERE tenant_attnum IS NULL AND NOT name = ANY (%(global)s) ORDER BY 1""",
    "global table listed but missing": """
        SELECT g FROM unnest(%(global)s::text[]) AS g
        WHERE to_regclass(g) IS NULL ORDER BY 1""",
    "tenant table without a primary key": f"""
        WITH t AS ({_TABLES})
        SELECT name FROM t
        WHERE distributed AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = t.oid AND k.contype = 'p')
        ORDER BY 1""",
    "primary key, unique key or unique index of a tenant table without tenant_id": f"""
        WITH t AS ({_TABLES})
        SELECT format('%%s (%%s)', t.name, ic.relname)
        FROM t JOIN pg_index i ON i.indrelid = t.oid JOIN pg_class ic ON ic.oid = i.indexrelid
        WHERE t.distributed AND i.indisunique AND NOT t.tenant_attnum = ANY (i.indkey::int2[])
        ORDER BY 1""",
    "foreign key between tenant tables that does not pair tenant_id": f"""
        WITH t AS ({_TABLES})
        SELECT format('%%s (%%s -> %%s)', src.name, k.conname, dst.name)
        FROM pg_constraint k JOIN t src ON src.oid = k.conrelid JOIN t dst ON dst.oid = k.confrelid
        WHERE k.contype = 'f' AND src.distributed AND dst.distributed
          AND NOT EXISTS (SELECT 1 FROM unnest(k.conkey, k.confkey) AS p(s, d)
                          WHERE p.s = src.tenant_attnum AND p.d = dst.tenant_attnum)
        ORDER BY 1""",
    "foreign key from a global table to a tenant table (a reference table cannot reference a distributed one)": f"""
        WITH t AS ({_TABLES})
        SELECT format('%%s (%%s -> %%s)', src.name, k.conname, dst.name)
        FROM pg_constraint k JOIN t src ON src.oid = k.conrelid JOIN t dst ON dst.oid = k.confrelid
        WHERE k.contype = 'f' AND NOT src.distributed AND dst.distributed
        ORDER BY 1""",
}


def distributable_problems(url: str) -> list[str]:
    """One readable line per obstacle to distributing the schema by tenant_id, known ones
    (KNOWN_OBSTACLES) left out; a known obstacle that is gone is reported too (the list stays true)."""
    params = {"global": sorted(GLOBAL_TABLES)}
    found: list[str] = []
    with psycopg.connect(url) as conn:
        for title, query in CHECKS.items():
            found.extend(f"{title}: {row[0]}" for row in conn.execute(query, params).fetchall())
    gone = "known obstacle no longer found (remove it from KNOWN_OBSTACLES)"
    stale = [f"{gone}: {known}" for known in KNOWN_OBSTACLES if known not in found]
    return [line for line in found if line not in KNOWN_OBSTACLES] + stale


def distribution_plan(url: str) -> list[tuple[str, str]]:
    """(table, how Citus would hold it): distributed by tenant_id, or reference/coordinator and why."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(_TABLES + " ORDER BY 2", {"global": sorted(GLOBAL_TABLES)}).fetchall()
    return [
        (name, "distributed by tenant_id" if distributed else GLOBAL_TABLES.get(name, "not listed"))
        for _, name, distributed, _ in rows
    ]
