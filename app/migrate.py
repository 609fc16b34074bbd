"""`dlw migrate`: apply pending yoyo migrations, then (re-)apply the SQL program in sql/.

Both steps run while holding a PostgreSQL advisory lock and yoyo's own lock, so concurrent
runs against one database queue up instead of interleaving. The SQL program is re-applied
only when its content changed (or when forced), so a second run changes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
from yoyo import get_backend, read_migrations

from app.paths import migrations_dir, sql_dir

# Arbitrary but fixed key for pg_advisory_lock: "dlw migrate" in one bigint.
MIGRATE_LOCK_KEY = 0x646C_776D_6967


@dataclass(frozen=True)
class MigrateResult:
    applied: list[str]
    program_applied: bool
    program_sha256: str


def yoyo_url(url: str) -> str:
    """yoyo needs its psycopg 3 scheme; accept ordinary postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def program_files(directory: Path | None = None) -> list[Path]:
    return sorted((directory or sql_dir()).glob("*.sql"))


def program_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def migration_ids() -> list[str]:
    return [m.id for m in read_migrations(str(migrations_dir()))]


def apply_program(conn: psycopg.Connection, files: list[Path]) -> None:
    """Run every sql/ file in one transaction, as dlw_owner unless a file switches role."""
    with conn.transaction():
        for path in files:
            conn.execute("SET LOCAL ROLE dlw_owner")
            conn.execute(path.read_text())  # type: ignore[arg-type]
        conn.execute("RESET ROLE")


def migrate(url: str, *, force_program: bool = False) -> MigrateResult:
    files = program_files()
    sha = program_sha256(files)
    with psycopg.connect(url, autocommit=True) as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        backend = get_backend(yoyo_url(url))
        try:
            with backend.lock(timeout=600):
                migrations = read_migrations(str(migrations_dir()))
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
                applied = [m.id for m in pending]
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT program_sha256, migrations FROM dlw.schema_program").fetchone()
                    ids = [m.id for m in migrations]
                    program_applied = force_program or row is None or row[0] != sha
                    if program_applied:
                        apply_program(conn, files)
                    conn.execute("SELECT dlw.secure_database()")
                    if program_applied or row is None or list(row[1]) != ids:
                        conn.execute(
                            "INSERT INTO dlw.schema_program (program_sha256, migrations)"
                            " VALUES (%s, %s) ON CONFLICT (singleton) DO UPDATE"
                            " SET program_sha256 = excluded.program_sha256,"
                            "     migrations = excluded.migrations, applied_at = now()",
                            (sha, ids),
                        )
                    conn.commit()
        finally:
            backend.connection.close()
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    return MigrateResult(applied=applied, program_applied=program_applied, program_sha256=sha)
