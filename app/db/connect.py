"""Which connection carries what, and how to open it safely behind a transaction pooler.

`DLW_DATABASE_URL` may point at PgBouncer in transaction mode: every transaction may run on a
different server connection, so nothing may outlive a transaction there. Two rules follow:

- no named prepared statements on that URL (asyncpg's statement cache names them
  `__asyncpg_stmt_N__`; they stay on whichever server connection parsed them, and the next
  statement may run on another one): the pool and every one-off connection run with
  `statement_cache_size=0`, so asyncpg uses the unnamed statement, which lives only until the
  end of its own extended-protocol exchange (asyncpg sends Parse/Describe/Flush, then
  Bind/Execute/Sync: one server connection throughout);
- whatever needs a session (LISTEN, the snapshot leader's session-level advisory lock and
  idle_session_timeout) goes to `DLW_DIRECT_DATABASE_URL`, a session connection (PostgreSQL
  itself, or a pooler in session mode); it defaults to `DLW_DATABASE_URL`.

`DLW_DATABASE_POOLER` says which applies: `transaction`, `none`, or `auto` (the default), which
detects a pooler at startup: PostgreSQL accepts an unknown `dlw.*` startup parameter as a
custom setting, PgBouncer refuses it ("unsupported startup parameter") or drops it (when it is
listed in ignore_startup_parameters). Behind a pooler without a separate direct URL, startup is
refused: LISTEN and the leader's lock would silently not work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from app.config import Settings
from app.db.pool import role_safety_problem
from app.db.queries import SQL

log = logging.getLogger("dlw.db")

PROBE_SETTING = "dlw.pooler_probe"
PROBE_VALUE = "direct"
# asyncpg keyword arguments for any connection that may reach a transaction pooler.
NO_NAMED_STATEMENTS: dict[str, int] = {"statement_cache_size": 0}


class PoolerMisconfigured(RuntimeError):
    """A transaction pooler without a session connection for LISTEN and the leader."""


class Unreachable(RuntimeError):
    """A configured URL does not connect; the message names the setting."""


@dataclass(frozen=True)
class Endpoints:
    """The API's two connections: `url` for requests (maybe pooled), `direct_url` for sessions."""

    url: str
    direct_url: str
    pooled: bool  # url is a transaction pooler: no named prepared statements on it

    def pool_options(self) -> dict[str, int]:
        """asyncpg options for connections to `url`."""
        return dict(NO_NAMED_STATEMENTS) if self.pooled else {}


async def connect_once(url: str, **kwargs: object) -> asyncpg.Connection:
    """A short-lived connection that may go through a transaction pooler (no named statements:
    one left behind on a server connection would collide with the next client's)."""
    conn: asyncpg.Connection = await asyncpg.connect(url, timeout=10, **NO_NAMED_STATEMENTS, **kwargs)  # type: ignore[arg-type]
    return conn


async def behind_pooler(url: str) -> bool:
    """True when a pooler sits between `url` and PostgreSQL (the startup-parameter probe)."""
    try:
        conn = await connect_once(url, server_settings={PROBE_SETTING: PROBE_VALUE})
    except asyncpg.ProtocolViolationError as exc:
        if "unsupported startup parameter" in str(exc):
            return True
        raise
    try:
        return bool(await conn.fetchval(SQL["pooler_probe"], PROBE_SETTING, PROBE_VALUE))
    finally:
        await conn.close()


async def resolve_endpoints(settings: Settings) -> Endpoints:
    """Endpoints for these settings, probing DLW_DATABASE_URL when DLW_DATABASE_POOLER=auto."""
    url = settings.database_url
    if not url:
        raise PoolerMisconfigured("DLW_DATABASE_URL is not set (the API connects as dlw_app)")
    mode = settings.database_pooler
    pooled = mode == "transaction" or (mode == "auto" and await behind_pooler(url))
    direct = settings.direct_database_url or url
    if pooled and not settings.direct_database_url:
        how = "DLW_DATABASE_POOLER=transaction" if mode == "transaction" else "detected (DLW_DATABASE_POOLER=auto)"
        raise PoolerMisconfigured(
            f"DLW_DATABASE_URL goes through a pooler ({how}): set DLW_DIRECT_DATABASE_URL to a session "
            "connection (PostgreSQL itself, or a session-mode pool) for LISTEN and the snapshot leader"
        )
    if pooled:
        log.info("DLW_DATABASE_URL is a pooler: no named prepared statements; sessions use DLW_DIRECT_DATABASE_URL")
    return Endpoints(url=url, direct_url=direct, pooled=pooled)


async def role_problems(endpoints: Endpoints) -> list[str]:
    """`SETTING: problem` for each URL whose role would defeat row-level security: the direct
    URL runs as dlw_app too, and is checked like DLW_DATABASE_URL."""
    urls = {"DLW_DATABASE_URL": endpoints.url}
    if endpoints.direct_url != endpoints.url:
        urls["DLW_DIRECT_DATABASE_URL"] = endpoints.direct_url
    problems = []
    for setting, url in urls.items():
        try:
            conn = await connect_once(url)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise Unreachable(f"{setting}: cannot connect ({exc.__class__.__name__}: {exc})") from exc
        try:
            problem = await role_safety_problem(conn)
        finally:
            await conn.close()
        if problem:
            problems.append(f"{setting}: {problem}")
    return problems
