"""`dlw` never answers an operator's mistake with a traceback: one line on stderr, an exit code
(1: it ran and failed; 2: it cannot run as asked), as real processes against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import sql

from tests.support.app import SECRET
from tests.support.database import MigratedDb, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def one_line(self, code: int, *fragments: str) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == code, (self.code, self.out, self.err)
        assert "Traceback" not in self.err + self.out, self.err
        assert len(lines) == 1, self.err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")}
    return env | extra


def dlw(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Ran:
    result = subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env or clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Ran(result.returncode, result.stdout, result.stderr)


# -- without a database -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("migrate", "--database-url", "nonsense"), "invalid database URL"),
        (("doctor", "--database-url", "postgresql://u:p@127.0.0.1:9/x"), "cannot connect to the database"),
        (("migrate", "--database-url", "postgresql://u:p@nohost.invalid/x"), "cannot connect to the database"),
        (("tenant", "list", "--database-url", "postgresql://u:p@127.0.0.1:9/x"), "cannot connect to the database"),
        (("token", "issue", "--role", "tenant_admin", "--tenant", "acme", "--database-url", "nonsense"), "invalid"),
    ],
)
def test_bad_or_unreachable_urls_are_one_line(args: tuple[str, ...], fragment: str):
    dlw(*args, env=clean_env(DLW_SYSTEM_JWT_SECRET=SECRET)).one_line(1, "dlw: ", fragment)


def test_serve_with_an_unreachable_database_is_refused_in_one_line():
    env = clean_env(
        DLW_DATABASE_URL="postgresql://dlw_app:x@127.0.0.1:9/dlw",
        DLW_SYSTEM_JWT_SECRET=SECRET,
        DLW_SECRET_KEY=SECRET,
        DLW_AUTH_MODE="tokens",
    )
    dlw("serve", "--port", str(free_port()), env=env).one_line(2, "refusing to start: DLW_DATABASE_URL: cannot connect")


@pytest.mark.parametrize("args", [(), ("token",), ("executor",), ("tenant",), ("reporting-login",), ("user",)])
def test_a_command_group_alone_prints_its_help(args: tuple[str, ...]):
    ran = dlw(*args)
    assert ran.code == 2 and "Traceback" not in ran.err
    assert "usage: dlw" in ran.err and "COMMAND" in ran.err


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("token", "issue", "--role", "executor", "--ttl", "soon"), "argument --ttl: 'soon' is not a positive whole"),
        (("migrate", "--lock-timeout", "x"), "argument --lock-timeout: 'x' is not a positive number"),
        (("migrate", "--lock-attempts", "0"), "argument --lock-attempts: '0' is not a positive whole number"),
        (("tenant", "set-quota", "acme", "--concurrent", "many"), "argument --concurrent: 'many' is not a whole"),
    ],
)
def test_option_errors_name_the_option_not_a_function(args: tuple[str, ...], option: str):
    ran = dlw(*args)
    assert ran.code == 2 and "Traceback" not in ran.err
    assert option in ran.err and "_positive" not in ran.err and "_non_negative" not in ran.err


def test_executor_storage_that_is_a_file_and_a_base_url_without_scheme(tmp_path: Path):
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    base = ("executor", "run", "--token", "t")
    dlw(*base, "--storage", str(afile)).one_line(2, "--storage", "is not a directory")
    ran = dlw(*base, "--storage", str(tmp_path / "dl"), "--base-url", "localhost:8000", timeout=30)
    ran.one_line(2, "--base-url must be an http:// or https:// URL")


def test_a_closed_pipe_is_not_an_error():
    """`dlw ... | head`: the reader went away before we wrote; no BrokenPipeError, no traceback."""
    env = clean_env(DLW_SYSTEM_JWT_SECRET=SECRET)
    for args in (["--help"], ["token", "issue", "--role", "executor"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # long before the interpreter has started
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert proc.returncode in (0, 1), (proc.returncode, err)


# -- against the test server --------------------------------------------------------------------
def test_wrong_password_and_missing_database(db: MigratedDb):
    wrong = db.url("dlw_app", "not-the-password")
    missing = db.server.url("dlw_no_such_database", "dlw_app", db.server.app_password)
    for url, fragment in ((wrong, "refused the login"), (missing, "no such database")):
        dlw("migrate", "--database-url", url).one_line(1, fragment)
        dlw("tenant", "list", "--database-url", url).one_line(1)
        env = clean_env(
            DLW_DATABASE_URL=url, DLW_SYSTEM_JWT_SECRET=SECRET, DLW_SECRET_KEY=SECRET, DLW_AUTH_MODE="tokens"
        )
        dlw("serve", "--port", str(free_port()), env=env).one_line(2, "DLW_DATABASE_URL: ", fragment)


def test_migrate_as_a_non_superuser_fails_at_once_saying_what_it_needs(db: MigratedDb):
    started = time.monotonic()
    ran = dlw("migrate", "--database-url", db.app_url)
    line = ran.one_line(2, "dlw_app is not a superuser", "needs a superuser URL")
    assert "DLW_MIGRATION_DATABASE_URL" in line
    # "At once": far from yoyo's 600 s lock wait it used to sit in (generous for a loaded machine).
    assert time.monotonic() - started < 120


def test_serve_on_an_unmigrated_database_says_run_migrate(db: MigratedDb):
    name = f"{db.name}_empty"[:63]
    db.server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        env = clean_env(
            DLW_DATABASE_URL=db.server.url(name, "dlw_app", db.server.app_password),
            DLW_SYSTEM_JWT_SECRET=SECRET,
            DLW_SECRET_KEY=SECRET,
            DLW_AUTH_MODE="tokens",
        )
        dlw("serve", "--port", str(free_port()), env=env).one_line(2, "not migrated: run dlw migrate")
    finally:
        db.server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_dev_on_a_broken_data_directory_hints_to_move_it_aside(tmp_path: Path):
    data_dir = tmp_path / "devdata"
    pgdata = data_dir / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("not a version\n")  # half a cluster: initdb is skipped, start fails
    ran = dlw("dev", "--data-dir", str(data_dir), "--port", str(free_port()), timeout=120)
    lines = [line for line in ran.err.splitlines() if line.startswith("dlw: ")]
    assert ran.code == 1 and "Traceback" not in ran.err + ran.out, ran.err
    assert len(lines) == 1 and "does not start" in lines[0] and f"mv {data_dir} {data_dir}.broken" in lines[0]


def test_dev_with_a_data_directory_that_is_a_file(tmp_path: Path):
    afile = tmp_path / "data"
    afile.write_text("x")
    dlw("dev", "--data-dir", str(afile), "--port", str(free_port())).one_line(1, "is not a directory")
