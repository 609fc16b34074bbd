"""A real PgBouncer (Debian's `pgbouncer`, installed by .ci/run) in transaction mode in front of
the test PostgreSQL: config and SCRAM userlist in a temporary directory, a free TCP port, and a
small server pool so that concurrent clients share server connections."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.support.database import MigratedDb, free_port, replace_url
from tests.support.requirements import require

BINARY = "/usr/sbin/pgbouncer"


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skips (locally) or fails (CI=true) when it is missing."""
    found = shutil.which("pgbouncer") or (BINARY if os.path.exists(BINARY) else None)
    require(None if found else "pgbouncer is not installed (Debian package pgbouncer)", "PgBouncer test")
    assert found
    return found


def _server_address(url: str) -> tuple[str, int]:
    """(host or socket directory, port) of the PostgreSQL server a libpq URL names."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    return host, port


def _unprivileged() -> dict[str, int]:
    """PgBouncer refuses to run as root: then it runs as the embedded server's system user."""
    if os.geteuid() != 0:
        return {}
    import pwd

    from app.ops.embedded import SYSTEM_USER

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True)
        entry = pwd.getpwnam(SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid}


@dataclass
class Bouncer:
    port: int
    db: MigratedDb
    logfile: Path

    @property
    def app_url(self) -> str:
        """dlw_app through the pooler (what DLW_DATABASE_URL points at)."""
        return replace_url(
            f"postgresql://dlw_app@127.0.0.1:{self.port}/{self.db.name}", password=self.db.server.app_password
        )

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


def _wait_listening(proc: subprocess.Popen[bytes], port: int, logfile: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited {proc.returncode}: {logfile.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("pgbouncer did not listen")


@contextmanager
def running_pgbouncer(db: MigratedDb, *, pool_size: int = 4) -> Iterator[Bouncer]:
    """PgBouncer with pool_mode=transaction and `pool_size` server connections per database/user;
    dlw_app authenticates to it with SCRAM against the verifier copied from pg_authid (so it
    holds no plaintext password) and PgBouncer authenticates to PostgreSQL with the same."""
    binary = pgbouncer_binary()
    with db.owner() as conn:
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'dlw_app'").fetchone()
    assert row and str(row[0]).startswith("SCRAM-SHA-256$"), "dlw_app has no SCRAM verifier"
    host, pg_port = _server_address(db.app_url)
    port = free_port()
    ids = _unprivileged()
    workdir = Path(tempfile.mkdtemp(prefix="dlw-pgbouncer-"))
    logfile = workdir / "pgbouncer.log"
    (workdir / "userlist.txt").write_text(f'"dlw_app" "{row[0]}"\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{db.name} = host={host} port={pg_port} dbname={db.name}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {workdir / 'userlist.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n"
        f"logfile = {logfile}\npidfile = {workdir / 'pgbouncer.pid'}\n"
        # No ignore_startup_parameters: DLW must not send any PgBouncer does not track.
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    for path in (workdir, *workdir.iterdir()):
        if ids:
            os.chown(path, ids["user"], ids["group"])
    proc = subprocess.Popen(
        [binary, str(workdir / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=ids.get("user"),
        group=ids.get("group"),
    )
    try:
        _wait_listening(proc, port, logfile)
        yield Bouncer(port=port, db=db, logfile=logfile)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
