"""The benchmark's PostgreSQL (BenchCluster): an embedded cluster from pgserver's binaries in a
temporary directory, durability off, a template database migrated once, one database per part.
"""

from __future__ import annotations

import secrets
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# Durability off: this measures CPU and locking, not the disk of whatever machine runs it.
PG_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "512MB",
}


# ------------------------------------------------------------------------------------------
# The benchmark's PostgreSQL
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchCluster:
    cluster: LocalCluster
    app_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    template: str = "dlw_bench_template"

    def superuser_url(self, dbname: str = "postgres") -> str:
        return self.cluster.url(dbname)

    def app_url(self, dbname: str) -> str:
        return self.cluster.url(dbname, "dlw_app", self.app_password)

    def execute(self, statement: sql.Composable | str, dbname: str = "postgres") -> None:
        with psycopg.connect(self.superuser_url(dbname), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def prepare_template(self) -> None:
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate(self.superuser_url(self.template))
        self.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(self.app_password)))

    def new_database(self, name: str) -> str:
        self.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self.template))
        )
        self.execute("SELECT dlw.secure_database()", name)  # database-level grants are not cloned
        return name

    def server_version(self) -> str:
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def postmaster_pid(self) -> int:
        return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])


@contextmanager
def bench_cluster() -> Iterator[BenchCluster]:
    with tempfile.TemporaryDirectory(prefix="dlw-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "pgdata", port=free_port(), extra_settings=PG_SETTINGS)
        cluster.start()
        try:
            bench = BenchCluster(cluster)
            bench.prepare_template()
            yield bench
        finally:
            cluster.destroy()
