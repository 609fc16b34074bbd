"""`dlw migrate`: apply pending yoyo migrations, then (re-)apply the SQL program in sql/.

Both steps run while holding a PostgreSQL advisory lock and yoyo's own lock, so concurrent
runs against one database queue up instead of interleaving. The SQL program is re-applied
only when its content changed (or when forced), so a second run changes nothing. Table locks
are waited for with a lock_timeout and bounded retries (app/ops/lock_waits.py), so a session
that holds a lock (an idle reporting transaction) never makes migrate, and every API query
queued behind it, hang.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations

from app.ops.lock_waits import LockPolicy, session_url, with_lock_retries
from app.ops.paths import migrations_dir, sql_dir

# Arbitrary but fixed key for pg_advisory_lock: "dlw migrate" in one bigint.
MIGRATE_LOCK_KEY = 0x646C_776D_6967

log = logging.getLogger("dlw.migrate")


@dataclass(frozen=True)
class MigrateResult:
    applied: list[str]
    program_applied: bool
    program_sha256: str
    snapshot_runner: str = "leader"


def yoyo_url(url: str) -> str:
    """yoyo needs its psycopg 3 scheme; accept ordinary postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def pinned_to(url: str, conn: psycopg.Connection) -> str:
    """A multi-host URL (a failover formation's `host1:p1,host2:p2/...?target_session_attrs=
    read-write`, docs/high-availability.md) narrowed to the server `conn` reached: yoyo parses one host
    only, and every step must migrate the server that holds the migrate lock."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts or conn.info.host.startswith("/"):
        return url
    host = f"[{conn.info.host}]" if ":" in conn.info.host else conn.info.host
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{conn.info.port}"))


def program_files(directory: Path | None = None) -> list[Path]:
    return sorted((directory or sql_dir()).glob("*.sql"))


def program_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def migration_ids() -> list[str]:
    return [m.id for m in read_migrations(str(migrations_dir()))]


# Every sql/ file declares on its first line the role that creates (and so owns) its objects.
PROGRAM_OWNERS = ("dlw_owner", "dlw_system", "dlw_login_manager")
_OWNER_HEADER = re.compile(r"-- owner: ([a-z_]+)\s*$")
_ROLE_SWITCH = re.compile(r"^\s*(SET|RESET)\s+(SESSION\s+|LOCAL\s+)?ROLE\b", re.IGNORECASE | re.MULTILINE)


class ProgramFileError(ValueError):
    """A sql/ file without a valid owner header, or one that switches role itself."""


def file_owner(path: Path, text: str | None = None) -> str:
    """The owner a program file declares on its first line (`-- owner: <role>`)."""
    text = path.read_text() if text is None else text
    first = text.split("\n", 1)[0]
    match = _OWNER_HEADER.fullmatch(first.rstrip())
    if match is None:
        raise ProgramFileError(f"{path.name}: the first line must be '-- owner: <role>', not {first[:80]!r}")
    owner = match.group(1)
    if owner not in PROGRAM_OWNERS:
        raise ProgramFileError(f"{path.name}: unknown owner {owner!r} (one of {', '.join(PROGRAM_OWNERS)})")
    if _ROLE_SWITCH.search(text):
        raise ProgramFileError(f"{path.name}: switches role itself; its owner header decides the role")
    return owner


def apply_program(conn: psycopg.Connection, files: list[Path]) -> None:
    """Run every sql/ file in one transaction, each as the owner its header declares.

    Every header is checked before anything runs, so a bad file changes nothing."""
    program = [(path, path.read_text()) for path in files]
    owners = [file_owner(path, text) for path, text in program]
    with conn.transaction():
        for (_, text), owner in zip(program, owners, strict=True):
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
            conn.execute(text)  # type: ignore[arg-type]
        conn.execute("RESET ROLE")


def record_program(conn: psycopg.Connection, files: list[Path], sha: str, ids: list[str], *, force: bool) -> bool:
    """In one transaction: re-apply the program if it changed (or `force`), re-assert the
    database's privileges, record hash and migrations. Returns whether the program ran."""
    row = conn.execute("SELECT program_sha256, migrations FROM dlw.schema_program").fetchone()
    program_applied = force or row is None or row[0] != sha
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
    return program_applied


def require_superuser(conn: psycopg.Connection) -> None:
    """Refuse at once unless this login is a superuser: migrate creates cluster-wide roles and
    grants BYPASSRLS, which only a superuser may, and any other login would only get as far as
    yoyo's lock table (where it used to wait ten minutes for a lock it could never create)."""
    from app.operator_errors import EXIT_USAGE, OperatorError

    row = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is None or not row[1]:
        who = row[0] if row else "?"
        raise OperatorError(
            f"migrate: database role {who} is not a superuser; dlw migrate needs a superuser URL"
            " (--database-url or DLW_MIGRATION_DATABASE_URL): it creates the dlw_* roles and grants BYPASSRLS",
            EXIT_USAGE,
        )


def take_migrate_lock(conn: psycopg.Connection) -> None:
    """The advisory lock that serialises migrate runs on one database (only superusers may take
    advisory locks there besides the platform's two try-locks; sql/05_database.sql)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATE_LOCK_KEY,)).fetchone()
    if not (row and row[0]):
        log.info("waiting for another dlw migrate of this database to finish")
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))


def migrate(
    url: str,
    *,
    force_program: bool = False,
    lock_timeout: float = LockPolicy.timeout,
    lock_attempts: int = LockPolicy.attempts,
    lock_backoff: float = LockPolicy.backoff,
) -> MigrateResult:
    """Apply pending migrations, then the program. Every connection of the two steps waits at most
    `lock_timeout` seconds for a lock; a step that times out is retried `lock_attempts` times in all
    (app/ops/lock_waits.py), then MigrateLockTimeout."""
    policy = LockPolicy(lock_timeout, lock_attempts, lock_backoff)
    session = f"dlw migrate {os.getpid()}-{secrets.token_hex(3)}"
    files = program_files()
    sha = program_sha256(files)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as lock_conn:
        require_superuser(lock_conn)
        step_url = session_url(pinned_to(url, lock_conn), session, policy.timeout)
        take_migrate_lock(lock_conn)
        backend = get_backend(yoyo_url(step_url))
        try:
            with backend.lock(timeout=600):
                migrations = read_migrations(str(migrations_dir()))
                applied = [m.id for m in backend.to_apply(migrations)]
                with_lock_retries(
                    lambda: backend.apply_migrations(backend.to_apply(migrations)),
                    what="applying migrations",
                    url=url,
                    session=session,
                    policy=policy,
                )
                ids = [m.id for m in migrations]

                def program_step() -> bool:
                    with psycopg.connect(step_url) as conn:
                        return record_program(conn, files, sha, ids, force=force_program)

                program_applied = with_lock_retries(
                    program_step, what="applying the sql program", url=url, session=session, policy=policy
                )
                runner = schedule_snapshot_refresh(url)
        finally:
            backend.connection.close()
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    return MigrateResult(
        applied=applied, program_applied=program_applied, program_sha256=sha, snapshot_runner=runner.runner
    )


# -- Snapshot runner: a pg_cron job where the server preloads pg_cron ---------------------------
# Kept apart from the migrations above: it depends on the server's configuration, not on the
# schema, and is re-checked on every run. The choice is recorded in dlw.snapshot_state (runner,
# runner_detail); the API reads it at startup and runs its own leader loop only for "leader".

CRON_JOB = "dlw-refresh-quota-snapshots"
CRON_SCHEDULE = "* * * * *"  # every minute (pg_cron 1.4 schedules in GMT; irrelevant at this granularity)
CRON_COMMAND = "SELECT dlw.refresh_quota_snapshots()"


@dataclass(frozen=True)
class RunnerChoice:
    runner: str  # "pg_cron" or "leader"
    detail: str


def _pg_cron_preloaded(conn: psycopg.Connection) -> bool | None:
    """Whether shared_preload_libraries names pg_cron; None when this role may not read it."""
    try:
        with conn.transaction():
            value = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    libraries = str(value[0] if value else "")
    return "pg_cron" in [part.strip().strip('"') for part in libraries.split(",")]


def _choose_runner(url: str) -> RunnerChoice:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_database(),"
            "       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron'),"
            "       current_setting('cron.database_name', true)"
        ).fetchone()
        assert row is not None
        dbname, available, cron_db = str(row[0]), bool(row[1]), row[2]
        preloaded = _pg_cron_preloaded(conn)
        # pg_cron defines cron.database_name only when it is loaded, i.e. preloaded.
        if not available or not cron_db or preloaded is False:
            why = "not installed" if not available else "not in shared_preload_libraries"
            return RunnerChoice("leader", f"pg_cron {why}: the API leader refreshes")
        job = CRON_JOB if cron_db == dbname else f"{CRON_JOB}:{dbname}"
        try:
            if cron_db == dbname:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
                jobid = conn.execute("SELECT cron.schedule(%s, %s, %s)", (job, CRON_SCHEDULE, CRON_COMMAND)).fetchone()
            else:
                # pg_cron keeps its jobs in the database named by cron.database_name; from there
                # a job may run in another database.
                with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname=cron_db), autocommit=True) as cron:
                    cron.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
                    jobid = cron.execute(
                        "SELECT cron.schedule_in_database(%s, %s, %s, %s)", (job, CRON_SCHEDULE, CRON_COMMAND, dbname)
                    ).fetchone()
        except (psycopg.Error, OSError) as exc:
            log.warning("pg_cron is preloaded but the refresh job could not be scheduled: %s", exc)
            return RunnerChoice(
                "leader", f"pg_cron job not scheduled ({exc.__class__.__name__}): the API leader refreshes"
            )
        jobid_text = jobid[0] if jobid else "?"
        return RunnerChoice("pg_cron", f"pg_cron job {job} (id {jobid_text}) in database {cron_db}, every minute")


def schedule_snapshot_refresh(url: str) -> RunnerChoice:
    """Schedule dlw.refresh_quota_snapshots() every minute with pg_cron when the server preloads
    it (idempotent: pg_cron upserts the job by name), else leave it to the API's leader; record
    which in dlw.snapshot_state."""
    choice = _choose_runner(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE dlw.snapshot_state SET runner = %s, runner_detail = %s"
            " WHERE runner IS DISTINCT FROM %s OR runner_detail IS DISTINCT FROM %s",
            (choice.runner, choice.detail, choice.runner, choice.detail),
        )
    log.info("snapshot runner: %s (%s)", choice.runner, choice.detail)
    return choice
