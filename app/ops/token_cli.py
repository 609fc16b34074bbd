"""`dlw token issue`: mint a system JWT for a tenant (resolved in the database) and print it."""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.config import DEFAULT_JWT_SECRET, get_settings
from app.db.connect import connect_once
from app.ops.queries import query


async def _resolve_tenant(url: str, ref: str) -> tuple[int, bool] | None:
    conn = await connect_once(url)  # DLW_DATABASE_URL may be a transaction pooler
    try:
        row = await conn.fetchrow(query("resolve_tenant"), ref)
    finally:
        await conn.close()
    return None if row is None else (int(row["tenant_id"]), bool(row["active"]))


def _refuse(message: str) -> int:
    print(f"dlw: {message}", file=sys.stderr)
    return 2


def cmd_token_issue(args: argparse.Namespace) -> int:
    from app.api.startup_guard import MIN_SECRET_BYTES
    from app.identity import system_jwt
    from app.identity.principal import Principal

    settings = get_settings()
    secret = settings.system_jwt_secret
    if not settings.auth_dev_mode and (secret == DEFAULT_JWT_SECRET or len(secret.encode()) < MIN_SECRET_BYTES):
        return _refuse(f"DLW_SYSTEM_JWT_SECRET is the default or shorter than {MIN_SECRET_BYTES} bytes")
    if args.tenant is None:
        if args.role != "executor":
            return _refuse("--tenant is required (only executor tokens may span all tenants)")
        tenant_id = 0  # a system-wide executor: its tenant context matches no tenant's rows
    else:
        url = args.database_url or settings.database_url or settings.migration_database_url
        if not url:
            return _refuse("no database to resolve the tenant: pass --database-url or set DLW_DATABASE_URL")
        found = asyncio.run(_resolve_tenant(url, args.tenant))
        if found is None:
            return _refuse(f"no tenant {args.tenant!r}")
        tenant_id, active = found
        if not active:
            return _refuse(f"tenant {args.tenant!r} is deactivated")
    user = args.user or f"cli:{args.role}"
    principal = Principal(user_id=user, tenant_id=tenant_id, role=args.role, is_service=args.user is None)
    print(system_jwt.issue(secret, principal, args.ttl or settings.system_jwt_ttl_seconds))
    return 0
