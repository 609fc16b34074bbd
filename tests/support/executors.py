"""Reference executors (`dlw executor run`) as real processes for the end-to-end tests."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.support import server
from tests.support.app import bearer, token


class HasUrl(Protocol):
    """A file endpoint: the e2e file server or the hub emulator."""

    url: str


def start_executor(api: str, hub: HasUrl, storage: Path, label: str, *extra: str) -> subprocess.Popen[str]:
    """A real `dlw executor run`, returned once it is in its run loop (so a SIGTERM from the test
    is the clean stop the test means, not one that lands while the interpreter still imports).
    Its log goes to a file next to the storage, read back by stop_executor."""
    env = server.serve_env(
        None, DLW_EXECUTOR_TOKEN=token(0, "executor", user_id="e2e-executor"), DLW_EXECUTOR_BASE_URL=api
    )
    command = [sys.executable, "-m", "app", "executor", "run", "--storage", str(storage), "--hf-endpoint", hub.url]
    log_path = storage.parent / f"executor-{label}-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*command, "--label", label, "--poll-seconds", "0.2", *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while f"executor {label}: claiming from" not in log_path.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, f"executor {label} did not start: {log_path.read_text()}"
        time.sleep(0.05)
    return proc


def stop_executor(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=20)
    return proc.returncode, proc.log_path.read_text()  # type: ignore[attr-defined]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, executors: tuple[subprocess.Popen[str], ...] = ()
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    logs = [stop_executor(proc, signal.SIGKILL) for proc in executors]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; executors (exit code, log): {logs}")


def create_task(api: str, tid: int, repo: str, revision: str, files: list[dict[str, Any]]) -> httpx.Response:
    """`POST /api/v1/tasks` with an explicit manifest, as the tenant's operator."""
    return httpx.post(
        f"{api}/api/v1/tasks",
        headers=bearer(token(tid, "tenant_operator")),
        json={"repo_id": repo, "revision": revision, "files": files},
        timeout=10,
    )


def task_of(api: str, tid: int, task_id: str) -> dict[str, Any]:
    """The task as its tenant's viewer reads it (`GET /api/v1/tasks/{id}`)."""
    got = httpx.get(f"{api}/api/v1/tasks/{task_id}", headers=bearer(token(tid, "tenant_viewer")), timeout=10)
    return dict(got.json())


def quota_of(api: str, tid: int) -> dict[str, Any]:
    """The tenant's limits and usage as its viewer reads them (`GET /api/v1/quota/current`)."""
    got = httpx.get(f"{api}/api/v1/quota/current", headers=bearer(token(tid, "tenant_viewer")), timeout=10)
    assert got.status_code == 200, got.text
    return dict(got.json())


def _finished(api: str, tid: int, task_id: str) -> bool:
    return task_of(api, tid, task_id)["status"] in ("succeeded", "failed")


def run_until_finished(
    api: str, hub: HasUrl, storages: Sequence[Path], label: str, tid: int, task_ids: Sequence[str]
) -> str:
    """One executor (the first of `storages` its --storage root, the others extra roots) runs
    until every task is succeeded or failed, then stops cleanly; its log."""
    extra = [arg for root in storages[1:] for arg in ("--storage", str(root))]
    executor = start_executor(api, hub, storages[0], label, *extra)
    try:
        for task_id in task_ids:
            wait_for(functools.partial(_finished, api, tid, task_id), 60, task_id, (executor,))
    finally:
        code, log = stop_executor(executor)
    assert code == 0, log
    return log
