"""Real PostgreSQL for the tests, from the first source that is available:

1. DLW_TEST_DATABASE_URL: a superuser URL of a server you run (its databases are created and
   dropped by the suite; its cluster roles dlw_* are created or reused);
2. a testcontainers PostgreSQL 15 container, when a Docker daemon answers a ping;
3. the embedded server (pgserver's binaries), started in a temporary directory.

Every test module gets its own database cloned from a template migrated once per session.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from app.ops.migrate import migrate

_counter = itertools.count()


def replace_url(url: str, *, user: str | None = None, password: str | None = None, dbname: str | None = None) -> str:
    """The same server URL with another user, password or database."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    old_user = parts.username or ""
    old_password = parts.password
    user = old_user if user is None else user
    password = old_password if password is None else password
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    netloc = f"{auth}@{host}" if auth else host
    path = parts.path if dbname is None else "/" + quote(dbname, safe="")
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


@dataclass
class PgServer:
    """A PostgreSQL server the suite may create databases and roles on."""

    superuser_url: str  # to its maintenance database
    kind: str
    app_password: str
    template: str = ""  # the migrated database every module's database is cloned from

    def url(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        return replace_url(self.superuser_url, user=user, password=password, dbname=dbname)

    def execute(self, statement: str | sql.Composable, params: tuple[object, ...] = ()) -> None:
        with psycopg.connect(self.superuser_url, autocommit=True) as conn:
            conn.execute(statement, params)  # type: ignore[arg-type]


@dataclass
class MigratedDb:
    server: PgServer
    name: str

    @property
    def owner_url(self) -> str:
        """Superuser (migration) connection: bypasses RLS; used to seed and inspect."""
        return self.server.url(self.name)

    @property
    def app_url(self) -> str:
        """The API's runtime role, exactly as production connects."""
        return self.server.url(self.name, "dlw_app", self.server.app_password)

    def url(self, user: str, password: str) -> str:
        return self.server.url(self.name, user, password)

    def owner(self) -> psycopg.Connection:
        return psycopg.connect(self.owner_url, autocommit=True)


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def start_server(workdir: Path) -> Iterator[PgServer]:
    app_password = secrets.token_urlsafe(18)
    env_url = os.environ.get("DLW_TEST_DATABASE_URL")
    if env_url:
        yield _prepared(PgServer(env_url, "DLW_TEST_DATABASE_URL", app_password))
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:15", driver=None) as container:
            yield _prepared(PgServer(container.get_connection_url(), "testcontainers", app_password))
        return
    from app.ops.embedded import LocalCluster

    cluster = LocalCluster(
        workdir / "pgdata",
        port=free_port(),
        extra_settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    cluster.start()
    try:
        yield _prepared(PgServer(cluster.url(), "embedded", app_password))
    finally:
        cluster.destroy()


def _prepared(server: PgServer) -> PgServer:
    """Migrate a template database once; module databases are cloned from it."""
    template = f"dlw_template_{os.getpid()}"
    server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(template)))
    server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    migrate(server.url(template))
    server.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(server.app_password)))
    server.template = template
    return server


def create_database(server: PgServer, label: str) -> MigratedDb:
    name = f"dlw_t{os.getpid()}_{next(_counter)}_{label}"[:63]
    server.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(server.template))
    )
    database = MigratedDb(server, name)
    with database.owner() as conn:
        conn.execute("SELECT dlw.secure_database()")  # database-level grants are not cloned
    return database


def drop_database(db: MigratedDb) -> None:
    db.server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.name)))
