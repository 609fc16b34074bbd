"""Installed like a product: the built wheel in a new virtual environment, outside the checkout,
runs `dlw migrate`, `dlw doctor`, `dlw serve` and `dlw executor run` from another directory
against the test PostgreSQL (package data: migrations/, sql/, the query files, the RBAC model)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from psycopg import sql

from tests.support.app import SECRET
from tests.support.database import MigratedDb, free_port
from tests.support.requirements import require

ROOT = Path(__file__).resolve().parents[2]


def uv() -> str | None:
    local = ROOT / ".tools/bin/uv"
    return str(local) if local.exists() else shutil.which("uv")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ directory of a fresh venv holding only the built wheel and its dependencies."""
    tool = uv()
    require(None if tool else "uv (./run installs it in .tools/)", "uv builds and installs the wheel")
    assert tool is not None
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    subprocess.run([tool, "build", "--wheel", "--out-dir", str(work / "dist"), str(ROOT)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    wheel = next((work / "dist").glob("dlw-*.whl"))
    venv = work / "venv"
    base = os.path.realpath(sys.executable)  # the interpreter, not this checkout's .venv
    subprocess.run([tool, "venv", "--python", base, str(venv)], env=env, check=True, capture_output=True)
    python = str(venv / "bin/python")
    install = [tool, "pip", "install", "--compile-bytecode", "--python", python, str(wheel)]
    subprocess.run(install, env=env, check=True, capture_output=True)
    yield venv / "bin"


def product_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLW_", "VIRTUAL_ENV", "PYTHONPATH"))}
    return env | extra


def test_the_wheel_runs_outside_the_checkout(installed: Path, db: MigratedDb, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(installed / "python"), "-c", "import app; print(app.__file__)"], cwd=elsewhere,
                           env=product_env(), capture_output=True, text=True, check=True)  # fmt: skip
    assert str(installed.parent) in where.stdout and str(ROOT) not in where.stdout

    name = f"{db.name}_wheel"[:63]
    db.server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        owner_url = db.server.url(name)

        def dlw(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(installed / "dlw"), *args], cwd=elsewhere, env=product_env(**env),
                                  capture_output=True, text=True, timeout=300)  # fmt: skip

        migrated = dlw("migrate", "--database-url", owner_url)
        assert migrated.returncode == 0 and "migrations applied: 0001" in migrated.stdout, migrated.stderr
        doctor = dlw("doctor", "--database-url", owner_url)
        assert doctor.returncode == 0 and "catalog OK" in doctor.stdout, doctor.stdout + doctor.stderr
        executor_token = dlw("token", "issue", "--role", "executor", DLW_SYSTEM_JWT_SECRET=SECRET).stdout.strip()
        assert executor_token.count(".") == 2

        port = free_port()
        env = product_env(
            DLW_DATABASE_URL=db.server.url(name, "dlw_app", db.server.app_password),
            DLW_SYSTEM_JWT_SECRET=SECRET,
            DLW_SECRET_KEY=SECRET,
            DLW_AUTH_MODE="tokens",
        )
        api = subprocess.Popen([str(installed / "dlw"), "serve", "--port", str(port)], cwd=elsewhere, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        executor = None
        try:
            deadline = time.monotonic() + 180  # a loaded CI machine
            while time.monotonic() < deadline:
                assert api.poll() is None, api.communicate()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise AssertionError("the installed API did not become ready")
            log_path = tmp_path / "executor.log"
            with log_path.open("w") as log:
                executor = subprocess.Popen(
                    [str(installed / "dlw"), "executor", "run", "--base-url", f"http://127.0.0.1:{port}",
                     "--storage", str(tmp_path / "downloads"), "--poll-seconds", "0.2"],
                    cwd=elsewhere, env=product_env(DLW_EXECUTOR_TOKEN=executor_token),
                    stdout=subprocess.DEVNULL, stderr=log, text=True,
                )  # fmt: skip
            # In its run loop (signal handlers installed), then a few empty claims.
            deadline = time.monotonic() + 180
            while "claiming from" not in log_path.read_text():
                assert executor.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            time.sleep(1)
            executor.send_signal(signal.SIGTERM)
            executor.wait(timeout=30)
            err = log_path.read_text()
            assert executor.returncode == 0, err
            assert "claiming from" in err and "Traceback" not in err
        finally:
            if executor is not None and executor.poll() is None:
                executor.kill()
            api.terminate()
            api_out, api_err = api.communicate(timeout=30)
        assert "POST /api/v1/executor/claim 200" in api_out, api_out[-2000:] + api_err[-2000:]
    finally:
        db.server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
