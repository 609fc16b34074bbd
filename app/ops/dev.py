"""`dlw dev`: everything a newcomer needs on one machine, in one command.

An embedded PostgreSQL under the project-local data directory (kept across restarts), the
migrations, two demo tenants, and the API on 127.0.0.1 connected as dlw_app in dev mode.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from app.config import DEFAULT_JWT_SECRET, Settings, get_settings
from app.operator_errors import OperatorError, one_line
from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate
from app.ops.queries import query
from app.ops.serve import serve

DEV_DATABASE = "dlw"
DEMO_TENANTS = (("acme", "Acme Corporation"), ("globex", "Globex Corporation"))
# Dev-mode placement of new users: one email domain per demo tenant, dev@local into default.
DEV_TENANT_RULES = json.dumps(
    [
        {"email_domain": "acme.test", "tenant": "acme", "role": "tenant_admin"},
        {"email_domain": "globex.test", "tenant": "globex", "role": "tenant_admin"},
        {"email_domain": "local", "tenant": "default", "role": "tenant_admin"},
    ]
)
LOGIN_EXAMPLES = (("acme", "alice@acme.test"), ("globex", "bob@globex.test"), ("default", "dev@local"))


def dev_secret(data_dir: Path) -> str:
    """A random system-JWT secret kept beside the dev database, so tokens survive restarts."""
    path = data_dir / "dev-jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def login_instructions(host: str, port: int) -> str:
    lines = ["dlw dev: log in as a demo tenant's admin (dev mode, no identity provider needed):"]
    for slug, email in LOGIN_EXAMPLES:
        lines.append(f"  {slug:8} curl -sL 'http://{host}:{port}/api/v1/auth/login?email={email}'")
    lines.append("  then call the API with: -H 'Authorization: Bearer <system_jwt>'")
    return "\n".join(lines)


def executor_instructions(data_dir: Path, host: str, port: int) -> str:
    secret = shlex.quote(str(data_dir / "dev-jwt-secret"))
    issue = "./run dlw token issue --role executor"  # no --tenant: a system-wide executor
    return "\n".join(
        [
            "dlw dev: run an executor (downloads every tenant's files) in another terminal with:",
            f'  export DLW_EXECUTOR_TOKEN="$(DLW_SYSTEM_JWT_SECRET=$(cat {secret}) {issue})"',
            f"  ./run dlw executor run --base-url http://{host}:{port} --storage ./downloads",
        ]
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse before touching anything when the API could not bind its port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets too
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise OperatorError(f"dev: port {port} on {host} {reason}: stop what holds it or pass --port") from None


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One `dlw dev` per data directory: an exclusive lock on <data dir>/dev.lock, which holds
    the holder's pid. The kernel drops the lock when the holder dies, so a stale file blocks nothing."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "dev.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OperatorError(
                f"dev: {data_dir} is in use by another dlw dev (pid {holder}); stop it, or pass another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def start_cluster(cluster: LocalCluster, data_dir: Path) -> bool:
    """Start the embedded PostgreSQL; True when this process started it (and so may stop it)."""
    try:
        if cluster.running():
            return False
        cluster.start()
    except (RuntimeError, OSError) as exc:
        log = cluster.datadir / "server.log"
        aside = shlex.quote(str(data_dir)) + ".broken"
        raise OperatorError(
            f"dev: the embedded PostgreSQL in {cluster.datadir} does not start ({one_line(exc)[:200]}); "
            f"see {log}, or move the data directory aside (mv {shlex.quote(str(data_dir))} {aside}) to start afresh"
        ) from None
    return True


async def _create_database(server_url: str, dbname: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval(query("database_exists"), dbname):
            await conn.execute(await conn.fetchval(query("create_database_statement"), dbname))
    finally:
        await conn.close()


async def _seed(owner_url: str, app_password: str) -> None:
    conn = await asyncpg.connect(owner_url)
    try:
        for slug, name in DEMO_TENANTS:
            await conn.execute(query("provision_tenant"), slug, name)
        # A fresh random password on each start: only this process knows it.
        await conn.execute(await conn.fetchval(query("app_password_statement"), app_password))
    finally:
        await conn.close()


def prepare_database(cluster: LocalCluster, dbname: str = DEV_DATABASE) -> str:
    """Create, migrate and seed the dev database; return the dlw_app URL for the API."""
    asyncio.run(_create_database(cluster.url(), dbname))
    owner_url = cluster.url(dbname)
    migrate(owner_url)  # yoyo brings its own driver (psycopg); everything else here is asyncpg
    password = secrets.token_urlsafe(24)
    asyncio.run(_seed(owner_url, password))
    return cluster.url(dbname, user="dlw_app", password=password)


def data_cluster(data_dir: Path) -> LocalCluster:
    return LocalCluster(data_dir / "pgdata")


def cmd_dev(args: argparse.Namespace) -> int:
    base = get_settings()
    data_dir = Path(args.data_dir or base.data_dir)
    check_port_free(args.host, args.port)  # first: nothing is touched when the API could not serve
    if data_dir.exists() and not data_dir.is_dir():
        raise OperatorError(f"dev: the data directory {data_dir} is not a directory: pass another --data-dir")
    with data_dir_lock(data_dir):
        return _run_dev(args, base, data_dir)


def _run_dev(args: argparse.Namespace, base: Settings, data_dir: Path) -> int:
    cluster = data_cluster(data_dir)
    print(f"dlw dev: embedded PostgreSQL in {cluster.datadir}", flush=True)
    # uvicorn re-raises the signal that stopped it; turn SIGTERM into SystemExit so the
    # embedded PostgreSQL below is still stopped cleanly (SIGINT already raises).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = start_cluster(cluster, data_dir)
    if not started:
        print("dlw dev: PostgreSQL was already running there (not started by us: left running on exit)")
    try:
        app_url = prepare_database(cluster)
        update: dict[str, object] = {"database_url": app_url, "auth_dev_mode": True}
        if base.system_jwt_secret == DEFAULT_JWT_SECRET:
            update["system_jwt_secret"] = dev_secret(data_dir)
        if base.auth_tenant_rules_json.strip() in ("", "[]"):
            update["auth_tenant_rules_json"] = DEV_TENANT_RULES
        settings = base.model_copy(update=update)
        print(f"dlw dev: migrated; connect as superuser with: psql '{cluster.url('dlw')}'")
        print(f"dlw dev: API on http://{args.host}:{args.port} (dev mode, database role dlw_app)")
        print(login_instructions(args.host, args.port))
        print(executor_instructions(data_dir, args.host, args.port), flush=True)
        return serve(settings, args.host, args.port)
    finally:
        if started and not args.keep_db_running:  # never stop a cluster this process did not start
            cluster.stop()
