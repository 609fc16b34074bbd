"""Real API server processes (`python -m app serve`) for tests that need more than one
instance, real concurrency, or the process's own startup behaviour."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from tests.support.app import SECRET, SECRET_KEY, UNUSED_ISSUER
from tests.support.database import MigratedDb, free_port


def serve_env(db: MigratedDb | None, **overrides: str | None) -> dict[str, str]:
    """The environment of a server: this process's, minus any DLW_ setting, plus a secure config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")}
    if db is not None:
        env.update(
            DLW_DATABASE_URL=db.app_url,
            DLW_SYSTEM_JWT_SECRET=SECRET,
            DLW_OIDC_ISSUER=UNUSED_ISSUER,
            DLW_SECRET_KEY=SECRET_KEY,
            DLW_HF_ENDPOINT="",  # no hub unless the test brings one
        )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start(
    env: dict[str, str], port: int, *, stdout: int | IO[str] | None = subprocess.DEVNULL, log: IO[str] | None = None
) -> subprocess.Popen[str]:
    """The server process; its stderr is a pipe, or the file `log` (with stdout) for a long run
    whose log the test reads afterwards (a pipe nobody reads would fill up and block it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        env=env,
        stdout=log if log is not None else stdout,
        stderr=log if log is not None else subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"server exited {proc.returncode}: {err or out}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=30)


@contextmanager
def running_server(db: MigratedDb, *, log: Path | IO[str] | None = None, **overrides: str | None) -> Iterator[str]:
    """A ready server on a free port; yields its base URL. With log (a path or an open file), its
    output goes there (a pipe nobody reads would block the server once full)."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "w")) if isinstance(log, Path) else log
        proc = start(serve_env(db, **overrides), port, log=out)
        try:
            wait_ready(proc, port)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
