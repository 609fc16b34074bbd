"""Reporting logins read, never disturb: a connection limit, role defaults the login cannot raise
(temp_file_limit), timeouts it can override but the watchdog enforces anyway, the DBA function
and CLI that change them, and `dlw doctor` noticing a login whose limits were removed."""

from __future__ import annotations

import argparse
import contextlib
import io
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app import domain
from app.ops.admin_cli import add_admin_commands
from app.ops.catalog_check import check_catalog
from app.ops.paths import migrations_dir
from tests.support.database import MigratedDb
from tests.support.psql import lit, ok, psql, sqlstates
from tests.support.tenants import apply_login_limits, create_dba_login, drop_login

PASSWORD = secrets.token_urlsafe(16)
LOGIN_PASSWORD = "limits-pw"


class Env:
    def __init__(self, db: MigratedDb) -> None:
        self.db = db
        self.dba = f"dba_lim_{secrets.token_hex(4)}"
        self.dba_url = db.url(self.dba, PASSWORD)
        self.logins: list[str] = [self.dba]

    def new_login(self, **limits: Any) -> str:
        """A reporting login of tenant `limits` made by the DBA function, with the limits given."""
        login = f"rep_lim_{secrets.token_hex(4)}"
        self.logins.append(login)
        ok(self.dba_url, f"SELECT dlw_admin.create_reporting_login({lit(login)}, 'limits', {lit(LOGIN_PASSWORD)});")
        if limits:
            args = ", ".join(f"{name} => {value}" for name, value in limits.items())
            ok(self.dba_url, f"SELECT * FROM dlw_admin.set_reporting_login_limits({lit(login)}, {args});")
        return login

    def url(self, login: str) -> str:
        return self.db.url(login, LOGIN_PASSWORD)


@pytest.fixture(scope="module")
def env(db: MigratedDb) -> Iterator[Env]:
    e = Env(db)
    create_dba_login(db, e.dba, PASSWORD)
    ok(e.dba_url, "SELECT dlw_admin.create_tenant('limits', 'Limits');")
    yield e
    for login in reversed(e.logins):
        drop_login(db, login)


def watchdog(db: MigratedDb) -> list[tuple[Any, ...]]:
    with db.owner() as conn:
        return conn.execute("SELECT pid, login, action FROM dlw.cancel_overlong_reporting_queries()").fetchall()


def wait_for(db: MigratedDb, login: str, state: str, older_than: float) -> int:
    """The pid of the login's backend once it has been in `state` for longer than `older_than` s."""
    column = "query_start" if state == "active" else "state_change"
    with db.owner() as conn:
        for _ in range(400):
            row = conn.execute(
                f"SELECT pid FROM pg_stat_activity WHERE usename = %s AND state = %s"
                f" AND clock_timestamp() - {column} > %s * interval '1 second'",
                (login, state, older_than),
            ).fetchone()
            if row:
                return int(row[0])
            time.sleep(0.025)
    raise AssertionError(f"{login} never was {state} for {older_than} s")


def wait_gone(db: MigratedDb, pid: int) -> None:
    """Until the backend the watchdog terminated has left pg_stat_activity (5 s at most)."""
    with db.owner() as conn:
        for _ in range(200):
            if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,):
                break
            time.sleep(0.025)
        else:
            raise AssertionError("the backend is still there")


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcome


# -- the connection limit ---------------------------------------------------------------------
def test_a_reporting_login_cannot_hold_more_connections_than_its_limit(db: MigratedDb, env: Env):
    """The attack: one login opening connection after connection until the server is full."""
    login = env.new_login()
    with db.owner() as conn:
        assert conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (login,)).fetchone() == (
            domain.DEFAULT_REPORTING_CONNECTION_LIMIT,
        )
    held: list[psycopg.Connection] = []
    try:
        for _ in range(domain.DEFAULT_REPORTING_CONNECTION_LIMIT):
            held.append(psycopg.connect(env.url(login)))
        for _ in range(3):
            with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
                held.append(psycopg.connect(env.url(login)))
        # everybody else still gets in
        with psycopg.connect(db.app_url) as app:
            assert app.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in held:
            conn.close()


# -- role defaults ----------------------------------------------------------------------------
def test_a_reporting_login_cannot_raise_its_temp_file_limit(db: MigratedDb, env: Env):
    login = env.new_login()
    with psycopg.connect(env.url(login), autocommit=True) as conn:
        assert conn.execute(
            "SELECT current_setting('temp_file_limit'), current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        ).fetchone() == ("1GB", "5min", "5min")
        for statement in (
            "SET temp_file_limit = -1",
            "SET temp_file_limit = '100GB'",
            "RESET temp_file_limit",
            "SELECT set_config('temp_file_limit', '-1', false)",
            f"ALTER ROLE {login} SET temp_file_limit = -1",
            f"ALTER ROLE {login} RESET temp_file_limit",
            f"ALTER ROLE {login} CONNECTION LIMIT -1",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute(f"ALTER ROLE {login} RESET ALL")  # allowed, but it keeps what the login may not reset
    with psycopg.connect(env.url(login)) as conn:
        assert conn.execute(
            "SELECT current_setting('temp_file_limit'), current_setting('statement_timeout')"
        ).fetchone() == ("1GB", "0"), "RESET ALL dropped the timeouts (the watchdog's business), not temp_file_limit"
    assert role_limits(db, login) == (5, ["temp_file_limit=1048576"])
    assert [p for p in check_catalog(db.owner_url) if login in p], "dlw doctor notices"
    ok(env.dba_url, f"SELECT * FROM dlw_admin.set_reporting_login_limits({lit(login)}, connection_limit => 5);")
    assert [p for p in check_catalog(db.owner_url) if login in p] == []


# -- the watchdog -----------------------------------------------------------------------------
def test_the_watchdog_cancels_a_statement_the_login_exempted_from_its_timeout(db: MigratedDb, env: Env):
    login = env.new_login(statement_timeout="'1 second'")
    with psycopg.connect(env.url(login), autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1s",)
        conn.execute("SET statement_timeout = 0")  # the login opts out of its own limit

        # Another role's long statement is never touched.
        other, other_outcome = in_thread(lambda: psycopg.connect(db.app_url).execute("SELECT pg_sleep(3)").fetchone())
        worker, outcome = in_thread(lambda: conn.execute("SELECT pg_sleep(60)").fetchone())
        pid = wait_for(db, login, "active", 1.2)
        wait_for(db, "dlw_app", "active", 1.2)
        assert watchdog(db) == [(pid, login, "cancelled")]
        worker.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        other.join(10)
        assert other_outcome == [("",)], "dlw_app's statement ran to its end"

        # The per-minute runner is the usage fold: it runs the watchdog too.
        worker, outcome = in_thread(lambda: conn.execute("SELECT pg_sleep(60)").fetchone())
        wait_for(db, login, "active", 1.2)
        with psycopg.connect(db.app_url) as app:
            assert app.execute("SELECT ran FROM dlw.refresh_quota_snapshots()").fetchone() == (True,)
        worker.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        # The session itself survives a cancel.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_watchdog_terminates_a_session_idle_in_transaction_past_its_limit(db: MigratedDb, env: Env):
    login = env.new_login(idle_in_transaction_timeout="'1 second'")
    with psycopg.connect(env.url(login)) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 0")
        conn.execute("SELECT count(*) FROM reporting.tasks").fetchone()  # and sits in the open transaction
        pid = wait_for(db, login, "idle in transaction", 1.2)
        assert watchdog(db) == [(pid, login, "terminated")]
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1").fetchone()
    wait_gone(db, pid)


def test_the_watchdog_leaves_sessions_within_their_limits_alone(db: MigratedDb, env: Env):
    login = env.new_login()
    with psycopg.connect(env.url(login)) as conn:
        conn.execute("SELECT 1").fetchone()  # idle in transaction, well within 5 min
        worker, outcome = in_thread(lambda: psycopg.connect(env.url(login)).execute("SELECT pg_sleep(1.5)").fetchone())
        wait_for(db, login, "active", 0.5)
        assert watchdog(db) == []
        worker.join(10)
        assert outcome == [("",)]
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- the DBA function and the CLI ---------------------------------------------------------------
def role_limits(db: MigratedDb, login: str) -> tuple[Any, ...]:
    with db.owner() as conn:
        row = conn.execute(
            "SELECT r.rolconnlimit, (SELECT array_agg(c ORDER BY c) FROM pg_db_role_setting s, unnest(s.setconfig) c"
            "                         WHERE s.setrole = r.oid AND s.setdatabase = 0)"
            " FROM pg_roles r WHERE r.rolname = %s",
            (login,),
        ).fetchone()
        assert row is not None
        return tuple(row)


def test_the_dba_function_changes_the_limits_and_is_audited(db: MigratedDb, env: Env):
    login = env.new_login()
    assert role_limits(db, login) == (
        5,
        ["idle_in_transaction_session_timeout=300000", "statement_timeout=300000", "temp_file_limit=1048576"],
    )
    out = ok(
        env.dba_url,
        f"SELECT * FROM dlw_admin.set_reporting_login_limits({lit(login)}, connection_limit => 2,"
        " statement_timeout => '30 s', temp_file_limit_bytes => pg_size_bytes('64 MB'));",
    )
    assert out == "2|00:00:30|00:05:00|67108864|00:15:00\n"
    assert role_limits(db, login) == (
        2,
        ["idle_in_transaction_session_timeout=300000", "statement_timeout=30000", "temp_file_limit=65536"],
    )
    with psycopg.connect(env.url(login)) as one, psycopg.connect(env.url(login)):
        assert one.execute("SHOW temp_file_limit").fetchone() == ("64MB",)
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(env.url(login))
    with db.owner() as conn:
        audit = conn.execute(
            "SELECT actor, detail FROM dlw.audit_log WHERE action = 'reporting_login.limits_set' AND target = %s",
            (login,),
        ).fetchall()
    assert len(audit) == 1 and audit[0][0] == env.dba
    assert audit[0][1]["before"]["connection_limit"] == 5 and audit[0][1]["after"]["connection_limit"] == 2
    assert audit[0][1]["after"]["temp_file_limit_kb"] == 65536

    # refusals change nothing
    outside = f"rep_lim_out_{secrets.token_hex(4)}"
    env.logins.append(outside)
    db.server.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE dlw_reporting").format(sql.Identifier(outside)))
    with db.owner() as conn:
        conn.execute("INSERT INTO dlw.reporting_logins (tenant_id, login) VALUES (1, %s)", (outside,))
        apply_login_limits(conn, outside)  # what a superuser mapping a role by hand does
    for call, code in {
        f"{lit(login)}, connection_limit => 0": "22023",
        f"{lit(login)}, connection_limit => 101": "22023",
        f"{lit(login)}, statement_timeout => '0'": "22023",
        f"{lit(login)}, idle_in_transaction_timeout => '2 days'": "22023",
        f"{lit(login)}, temp_file_limit_bytes => -1": "22023",
        f"{lit(login)}, transaction_timeout => '0.5 s'": "22023",
        f"{lit(login)}, transaction_timeout => '2 days'": "22023",
        f"'nobody_{secrets.token_hex(2)}', connection_limit => 3": "DLWA4",
        f"{lit(outside)}, connection_limit => 3": "DLWA7",
    }.items():
        result = psql(env.dba_url, f"SELECT * FROM dlw_admin.set_reporting_login_limits({call});")
        assert result.returncode == 3 and sqlstates(result.stderr) == [code], (call, result.stderr)
    assert role_limits(db, login)[0] == 2

    # the same from the command line
    parser = argparse.ArgumentParser(prog="dlw")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    for argv, code, expected in (
        (["--connection-limit", "4", "--idle-in-transaction-timeout", "90"], 0, "connection_limit=4"),
        (["--transaction-timeout", "600"], 0, "transaction_timeout=600s"),
        ([], 1, "nothing to set"),
        (["--connection-limit", "0"], 1, "[22023]"),
    ):
        args = parser.parse_args(["reporting-login", "set-limits", login, *argv, "--database-url", env.dba_url])
        out_buf, err_buf = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
            assert args.func(args) == code
        assert expected in (out_buf.getvalue() if code == 0 else err_buf.getvalue())
    assert role_limits(db, login) == (
        4,
        ["idle_in_transaction_session_timeout=90000", "statement_timeout=30000", "temp_file_limit=65536"],
    )


# -- dlw doctor -------------------------------------------------------------------------------
def test_doctor_reports_a_reporting_login_whose_limits_were_removed(db: MigratedDb, env: Env):
    login = env.new_login()
    assert check_catalog(db.owner_url) == []
    db.server.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(login)))
    problems = check_catalog(db.owner_url)
    assert problems == [
        f"reporting login without its connection limit or role defaults: {login}: connection limit -1 (expected 5)"
    ]
    # the login itself drops a timeout default; then one is overridden for this database
    ok(env.url(login), f"ALTER ROLE {login} SET statement_timeout = 0;")
    db.server.execute(
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET idle_in_transaction_session_timeout = 0").format(
            sql.Identifier(login), sql.Identifier(db.name)
        )
    )
    assert check_catalog(db.owner_url) == [
        f"reporting login without its connection limit or role defaults: {login}: connection limit -1 (expected 5),"
        " missing statement_timeout=300000, overridden for a database"
    ]
    ok(env.dba_url, f"SELECT * FROM dlw_admin.set_reporting_login_limits({lit(login)}, connection_limit => 5);")
    db.server.execute(
        sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(sql.Identifier(login), sql.Identifier(db.name))
    )
    assert check_catalog(db.owner_url) == []


def test_migration_0013_gives_existing_logins_their_limits(db: MigratedDb, env: Env):
    """A login mapped before 0013 (made by hand, no limits) gets them from the migration's step."""
    old = f"rep_lim_old_{secrets.token_hex(4)}"
    env.logins.append(old)
    db.server.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE dlw_reporting").format(sql.Identifier(old)))
    with db.owner() as conn:
        conn.execute("INSERT INTO dlw.reporting_logins (tenant_id, login) VALUES (1, %s)", (old,))
    assert any(old in problem for problem in check_catalog(db.owner_url))
    text = (migrations_dir() / "0013.reporting_login_limits.sql").read_text()
    step = text[text.index("DO $existing$") :]
    with db.owner() as conn:
        conn.execute(step)  # type: ignore[arg-type]
    assert check_catalog(db.owner_url) == []
    assert role_limits(db, old)[0] == 5
