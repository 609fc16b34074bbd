"""A real pg_auto_failover formation on this machine: a monitor, a primary and a synchronous
standby (Debian's PostgreSQL 15 with postgresql-15-auto-failover and pg-auto-failover-cli), each
node supervised by its own `pg_autoctl run` process.

PostgreSQL (and so pg_autoctl, whose initdb/pg_ctl refuse root) runs as an unprivileged OS user:
when the suite runs as root, as app.ops.embedded's SYSTEM_USER (created if missing), otherwise as
the current user. Everything lives in one private directory: data directories, the Unix sockets,
and pg_autoctl's XDG config/state/runtime directories (it keys them by data directory path).

Authentication: pg_autoctl's own roles (autoctl_node, pgautofailover_replicator/_monitor) and the
OS superuser are trusted on 127.0.0.1 by the rules pg_autoctl writes (`--auth trust`; production
uses scram or certificates, see docs/high-availability.md); every other role (dlw_app, reporting logins)
proves its SCRAM password, by a rule appended after pg_autoctl's own.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from app.ops.embedded import SYSTEM_USER, debian_bindir
from tests.support.database import MigratedDb, PgServer, free_port
from tests.support.requirements import require
from tests.support.server import serve_env

T = TypeVar("T")
PG_AUTOCTL = "/usr/bin/pg_autoctl"
FORMATION_DB = "dlw"
# Failure detection and promotion tuned for a test (production keeps pg_auto_failover's defaults
# or close to them; docs/high-availability.md). The keeper's network_partition_timeout (a primary that
# lost the monitor and its standby demotes itself) stays below primary_demote_timeout (the
# monitor's wait before promoting), as in the defaults (20 s < 30 s), so two primaries never
# accept writes at once.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "4s",
}
KEEPER_SETTINGS = {"timeout.network_partition_timeout": "3"}


def missing_pg_auto_failover() -> str | None:
    if debian_bindir(15) is None:
        return "Debian PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin/postgres)"
    if not Path(PG_AUTOCTL).exists():
        return "pg_autoctl is not installed (apt-get install pg-auto-failover-cli)"
    if not Path("/usr/lib/postgresql/15/lib/pgautofailover.so").exists():
        return "the pgautofailover extension is not installed (apt-get install postgresql-15-auto-failover)"
    return None


def _os_user() -> pwd.struct_passwd:
    """The unprivileged user the servers run as (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True)
        return pwd.getpwnam(SYSTEM_USER)


@dataclass
class Node:
    name: str
    port: int
    pgdata: Path
    proc: subprocess.Popen[str] | None = None


@dataclass
class Formation:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dlw-ha-")))
    monitor: Node = field(init=False)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.user = _os_user()
        self.bindir = debian_bindir(15) or Path("/usr/lib/postgresql/15/bin")
        os.chmod(self.workdir, 0o755)
        for sub in ("sock", "config", "share", "run"):
            (self.workdir / sub).mkdir()
        for path in [self.workdir, *self.workdir.iterdir()]:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.sockets = self.workdir / "sock"
        self.monitor = Node("monitor", free_port(), self.workdir / "monitor")

    # -- processes as the server user --------------------------------------------------
    def _env(self) -> dict[str, str]:
        w = self.workdir
        return {
            "PATH": f"{self.bindir}:/usr/bin:/bin",
            "HOME": str(w),
            "XDG_CONFIG_HOME": str(w / "config"),
            "XDG_DATA_HOME": str(w / "share"),
            "XDG_RUNTIME_DIR": str(w / "run"),
            "PGHOST": str(self.sockets),
            "PG_CONFIG": str(self.bindir / "pg_config"),
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args), capture_output=True, text=True, cwd="/", env=self._env(),
            user=self.user.pw_uid, group=self.user.pw_gid, check=False, timeout=120,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def _spawn(self, node: Node, *args: str) -> None:
        log = (self.workdir / f"{node.name}.log").open("a")
        node.proc = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, text=True, cwd="/", env=self._env(),
            user=self.user.pw_uid, group=self.user.pw_gid, start_new_session=True,
        )  # fmt: skip

    def log(self, node: Node) -> str:
        path = self.workdir / f"{node.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _initdb(self, node: Node, settings: dict[str, str]) -> None:
        """A data directory whose only rules are the local (socket) ones: pg_autoctl appends its
        host rules, and ours come after them (the first matching rule wins)."""
        self.run(str(self.bindir / "initdb"), "-D", str(node.pgdata), "--auth-local=trust",
                 "--encoding=UTF8", "--locale=C.UTF-8")  # fmt: skip
        (node.pgdata / "pg_hba.conf").write_text("local all all trust\nlocal replication all trust\n")
        with (node.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"unix_socket_directories = '{self.sockets}'\n")
            conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, *, node_settings: dict[str, str] | None = None) -> None:
        """Monitor, primary (`node1`), then a synchronous standby (`node2`) cloned from it."""
        self._initdb(self.monitor, {})
        ctl = str(self.bindir / "pg_ctl")
        self.run(PG_AUTOCTL, "create", "monitor", "--pgdata", str(self.monitor.pgdata),
                 "--pgport", str(self.monitor.port), "--hostname", "127.0.0.1", "--auth", "trust",
                 "--no-ssl", "--pgctl", ctl)  # fmt: skip
        with (self.monitor.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("".join(f"{k} = {v}\n" for k, v in MONITOR_SETTINGS.items()))
        self._spawn(self.monitor, PG_AUTOCTL, "run", "--pgdata", str(self.monitor.pgdata))
        for index in (1, 2):
            node = Node(f"node{index}", free_port(), self.workdir / f"node{index}")
            self.nodes.append(node)
            if index == 1:
                self._initdb(node, {"fsync": "off", **(node_settings or {})})
            self._spawn(node, PG_AUTOCTL, "create", "postgres", "--pgdata", str(node.pgdata),
                        "--pgport", str(node.port), "--listen", "127.0.0.1", "--hostname", "127.0.0.1",
                        "--name", node.name, "--dbname", FORMATION_DB, "--monitor", self.monitor_url,
                        "--auth", "trust", "--no-ssl", "--pgctl", ctl, "--replication-quorum", "true",
                        "--candidate-priority", "50", "--run")  # fmt: skip
            wanted = "single" if index == 1 else "secondary"
            self.wait(functools.partial(self._reached, node, wanted), 90, f"{node.name} {wanted}")
            for key, value in KEEPER_SETTINGS.items():
                self.run(PG_AUTOCTL, "config", "set", "--pgdata", str(node.pgdata), key, value)
            if index == 1:
                # DLW's own logins over TCP, with their passwords; named, so that this rule
                # cannot shadow the ones pg_autoctl appends later. node2 inherits the file.
                with (node.pgdata / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host {FORMATION_DB} dlw_app,+dlw_reporting 127.0.0.1/32 scram-sha-256\n")
                self.run(ctl, "-D", str(node.pgdata), "reload")
        self.wait(lambda: self.node_state("node1") == ("primary", "primary"), 60, "node1 primary")

    def _reached(self, node: Node, state: str) -> bool:
        if node is not self.nodes[0]:
            # pg_autoctl's pg_basebackup waits for a spread checkpoint (minutes): hurry it.
            self.checkpoint(self.nodes[0])
        return self.node_state(node.name) == (state, state)

    def checkpoint(self, node: Node) -> None:
        with psycopg.connect(self.socket_conninfo(node), autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def socket_conninfo(self, node: Node, dbname: str = "postgres") -> str:
        return f"host={self.sockets} port={node.port} dbname={dbname} user={self.user.pw_name}"

    @property
    def monitor_url(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover?sslmode=disable"

    def state(self) -> list[dict[str, Any]]:
        """`pg_autoctl show state --json`: one entry per data node."""
        result = self.run(PG_AUTOCTL, "show", "state", "--pgdata", str(self.monitor.pgdata), "--json", check=False)
        if result.returncode != 0:
            return []
        return list(json.loads(result.stdout or "[]"))

    def node_state(self, name: str) -> tuple[str, str] | None:
        for entry in self.state():
            if entry.get("nodename") == name:
                return str(entry["current_group_state"]), str(entry["assigned_group_state"])
        return None

    def show_state(self) -> str:
        return self.run(PG_AUTOCTL, "show", "state", "--pgdata", str(self.monitor.pgdata), check=False).stdout

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        logs = "\n".join(f"--- {n.name}\n{self.log(n)[-3000:]}" for n in [self.monitor, *self.nodes])
        raise AssertionError(f"formation: timed out after {timeout} s waiting for {what}\n{self.show_state()}\n{logs}")

    # -- URLs --------------------------------------------------------------------------
    def url(self, user: str, password: str | None = None, *, attrs: str = "read-write") -> str:
        """A multi-host URL over every data node, as the API is given in production."""
        auth = user + (f":{password}" if password else "")
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"postgresql://{auth}@{hosts}/{FORMATION_DB}?target_session_attrs={attrs}"

    def superuser_url(self) -> str:
        """The OS user's superuser, trusted on 127.0.0.1 for the formation's database."""
        return self.url(self.user.pw_name)

    def node_url(self, node: Node, user: str | None = None, password: str | None = None) -> str:
        auth = (user or self.user.pw_name) + (f":{password}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{node.port}/{FORMATION_DB}"

    # -- failure -----------------------------------------------------------------------
    def kill(self, node: Node) -> None:
        """The node dies: its keeper is killed (it would otherwise restart PostgreSQL), then
        PostgreSQL stops without a shutdown checkpoint (`pg_ctl stop -m immediate`)."""
        assert node.proc is not None
        for pid in _session_members(node.proc.pid):
            if _comm(pid) == "pg_autoctl":
                os.kill(pid, signal.SIGKILL)
        node.proc.wait(timeout=10)
        self.run(str(self.bindir / "pg_ctl"), "-D", str(node.pgdata), "stop", "-m", "immediate", check=False)

    def destroy(self) -> None:
        for node in [*self.nodes, self.monitor]:
            if node.proc is not None and node.proc.poll() is None:
                self.run(PG_AUTOCTL, "stop", "--pgdata", str(node.pgdata), "--immediate", check=False)
                try:
                    node.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(node.proc.pid, signal.SIGKILL)
            self.run(str(self.bindir / "pg_ctl"), "-D", str(node.pgdata), "stop", "-m", "immediate", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def running_formation(what: str) -> Iterator[Formation]:
    """A started formation (monitor, primary node1, synchronous standby node2), destroyed on
    exit; `what` is skipped locally, and fails under CI=true, without the Debian packages."""
    require(missing_pg_auto_failover(), what)
    formation = Formation()
    try:
        formation.start()
        yield formation
    finally:
        formation.destroy()


def migrated(formation: Formation) -> MigratedDb:
    """The formation's database, migrated with `dlw migrate` through the multi-host URL (it
    migrates whichever node is read-write), dlw_app given a password."""
    env = serve_env(None, DLW_MIGRATION_DATABASE_URL=formation.superuser_url())
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    srv = PgServer(formation.superuser_url(), "pg_auto_failover", secrets.token_urlsafe(18))
    srv.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(srv.app_password)))
    return MigratedDb(srv, FORMATION_DB)


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
