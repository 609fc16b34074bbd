"""The API servers the benchmarks start: the full `dlw serve` stack or the bare endpoint
(bench/bare_app.py), as a subprocess waited on until it answers, with their environments.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO

import httpx

from bench.cluster import ROOT, free_port

POOL_MIN, POOL_MAX = 2, 20  # the API's defaults (DLW_DB_POOL_MIN_SIZE / DLW_DB_POOL_MAX_SIZE)
JWT_SECRET = secrets.token_urlsafe(48)
UNUSED_ISSUER = "http://127.0.0.1:9/no-provider"  # required outside dev mode; never contacted here


# ------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------


def wait_http(proc: subprocess.Popen[bytes], url: str, timeout: float = 60) -> None:
    """Until `url` answers 200; RuntimeError if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not answer {url}")


@contextmanager
def server(
    argv: list[str], env: dict[str, str], ready_path: str, log: IO[bytes] | None = None
) -> Iterator[tuple[int, int]]:
    """A server subprocess on a free port; yields (port, pid). Its log goes to `log` (for a part
    that reads it) or a temp file."""
    port = free_port()
    with ExitStack() as stack:
        if log is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            [sys.executable, *argv, "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            try:
                wait_http(proc, f"http://127.0.0.1:{port}{ready_path}")
            except RuntimeError as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}\n{log.read().decode(errors='replace')[-3000:]}") from None
            yield port, proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DLW_", "BENCH_"))}


def full_stack_env(app_url: str) -> dict[str, str]:
    return {
        **base_env(),
        "DLW_DATABASE_URL": app_url,
        "DLW_SYSTEM_JWT_SECRET": JWT_SECRET,
        "DLW_OIDC_ISSUER": UNUSED_ISSUER,
        "DLW_SECRET_KEY": secrets.token_urlsafe(48),
        "DLW_HF_ENDPOINT": "",  # measured: admission, not a hub (bench tasks carry their files)
        "DLW_DB_POOL_MIN_SIZE": str(POOL_MIN),
        "DLW_DB_POOL_MAX_SIZE": str(POOL_MAX),
    }


def bare_env(app_url: str) -> dict[str, str]:
    return {
        **base_env(),
        "BENCH_DATABASE_URL": app_url,
        "BENCH_POOL_MIN_SIZE": str(POOL_MIN),
        "BENCH_POOL_MAX_SIZE": str(POOL_MAX),
    }
