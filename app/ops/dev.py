"""`dlw dev`: everything a newcomer needs on one machine, in one command.

An embedded PostgreSQL under the project-local data directory (kept across restarts), the
migrations, two demo tenants, and the API on 127.0.0.1 connected as dlw_app in dev mode.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import psycopg
from psycopg import sql

from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate

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


def prepare_database(cluster: LocalCluster, dbname: str = DEV_DATABASE) -> str:
    """Create, migrate and seed the dev database; return the dlw_app URL for the API."""
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    owner_url = cluster.url(dbname)
    migrate(owner_url)
    password = secrets.token_urlsafe(24)
    with psycopg.connect(owner_url, autocommit=True) as conn:
        for slug, name in DEMO_TENANTS:
            conn.execute("SELECT dlw.provision_tenant(%s, %s)", (slug, name))
        # A fresh random password on each start: only this process knows it.
        conn.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(password)))
    return cluster.url(dbname, user="dlw_app", password=password)


def data_cluster(data_dir: Path) -> LocalCluster:
    return LocalCluster(data_dir / "pgdata")
