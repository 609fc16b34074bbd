"""A local PostgreSQL cluster run from a data directory: the embedded default for `dlw dev`
and the test suite.

Binaries come from the `pgserver` wheel (no system PostgreSQL needed) or from any PostgreSQL
bin directory (e.g. Debian's PostgreSQL 15, which can preload pg_cron). Connections go through
a Unix socket in a private directory; the `postgres` superuser is trusted only on that socket,
every other role authenticates with SCRAM passwords, exactly as on a server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

# PostgreSQL refuses to run as root; when we are root it runs as this system user.
SYSTEM_USER = "dlw-postgres"
SUPERUSER = "postgres"


def _pgserver() -> None:
    """Import pgserver quietly: at import it probes a runtime dir we never use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver.utils  # noqa: F401


def pgserver_bindir() -> Path:
    """The bin directory of the PostgreSQL shipped inside the pgserver wheel."""
    _pgserver()
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def debian_bindir(major: int = 15) -> Path | None:
    """Debian's PostgreSQL bin directory for a major version, when installed."""
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    return path if (path / "postgres").exists() else None


def socket_url(socket_dir: Path, port: int, user: str, dbname: str, password: str | None = None) -> str:
    """A libpq/asyncpg URL for a Unix-socket connection."""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@/{quote(dbname, safe='')}?host={socket_dir}&port={port}"


@dataclass
class LocalCluster:
    datadir: Path
    bindir: Path = field(default_factory=pgserver_bindir)
    port: int = 5432
    preload_libraries: tuple[str, ...] = ()
    extra_settings: dict[str, str] = field(default_factory=dict)
    tcp: bool = False
    socket_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.datadir = self.datadir.resolve()
        # Unix socket paths are limited to ~107 bytes, so the socket lives in a short
        # directory derived from the data directory rather than inside it.
        digest = hashlib.sha256(str(self.datadir).encode()).hexdigest()[:12]
        self.socket_dir = Path(tempfile.gettempdir()) / f"dlw-pg-{digest}"

    # -- process identity -------------------------------------------------------------
    def _run_as(self) -> dict[str, int]:
        if os.geteuid() != 0:
            return {}
        import pwd

        _pgserver()
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        entry = pwd.getpwnam(SYSTEM_USER)
        # The unprivileged server must be able to reach its binaries and libraries.
        ensure_prefix_permissions(self.bindir)
        ensure_folder_permissions(self.bindir, 0o055)
        ensure_folder_permissions(self.bindir.parent / "lib", 0o044)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def _chown(self, path: Path, ids: dict[str, int]) -> None:
        if ids:
            os.chown(path, ids["user"], ids["group"])

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        ids = self._run_as()
        result = subprocess.run(
            list(args),
            check=False,
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
            user=ids.get("user"),
            group=ids.get("group"),
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    # -- lifecycle --------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        ids = self._run_as()
        self.datadir.mkdir(parents=True, exist_ok=True)
        if ids:
            from pgserver.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.datadir)
        self._chown(self.datadir, ids)
        os.chmod(self.datadir, 0o700)
        if self.initialized:
            return
        self._cmd(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", SUPERUSER,
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--auth=trust",  # replaced by the pg_hba.conf written below
        )  # fmt: skip
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(
            "# Written by dlw: the superuser is trusted only on the private socket directory;\n"
            "# every other role proves its password.\n"
            f"local all {SUPERUSER} trust\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        self._chown(hba, ids)

    def _settings(self) -> dict[str, str]:
        settings = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "listen_addresses": "'127.0.0.1'" if self.tcp else "''",
            "max_connections": "300",
            "password_encryption": "'scram-sha-256'",
            "timezone": "'UTC'",
        }
        if self.preload_libraries:
            settings["shared_preload_libraries"] = "'" + ",".join(self.preload_libraries) + "'"
        settings.update(self.extra_settings)
        return settings

    def start(self) -> None:
        self.init()
        if self.running():
            return
        ids = self._run_as()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir, ids)
        conf = self.datadir / "postgresql.auto.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in self._settings().items()))
        self._chown(conf, ids)
        log = self.datadir / "server.log"
        result = self._cmd(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log),
            "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{result.stdout}{result.stderr}\n{tail}")

    def running(self) -> bool:
        if not self.initialized:
            return False
        result = self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status", check=False)
        return result.returncode == 0

    def stop(self) -> None:
        if self.running():
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # -- connections ------------------------------------------------------------------
    def url(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        return socket_url(self.socket_dir, self.port, user, dbname, password)
