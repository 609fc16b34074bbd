"""End to end with real processes (`dlw serve`, tests/support/hub_server.py, `dlw executor run`):
the executor refuses to write outside its storage and needs a token and a storage directory; a
server that sends more or fewer bytes than declared fails the file (the byte quota holds), and
the executor never writes past the declared size."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.executor.client import Claimed
from app.executor.download import (
    Tuning,
    UnsafePath,
    WrongSize,
    destination,
    download,
    file_url,
    open_partial,
    partial_path,
)
from app.executor.layout import placement
from tests.support import server
from tests.support.app import token
from tests.support.executors import create_task, quota_of, start_executor, stop_executor, task_of, wait_for
from tests.support.hub_server import CHUNK, HubServer, api, hub, provision

__all__ = ["api", "hub"]  # shared fixtures (tests/support/hub_server.py)


def test_the_executor_refuses_to_write_outside_its_storage(work):
    def item(**overrides: str) -> Claimed:
        values: dict[str, Any] = {
            "id": "f",
            "tenant": "acme",
            "repo_id": "org/model",
            "revision": "main",
            "path": "a/b.bin",
            "size": 1,
            "sha256": None,
            "token": "t",
            "lease_seconds": 60,
        }
        return Claimed(**{**values, **overrides})

    assert destination(work, item()) == work.resolve() / "acme" / "org" / "model" / "main" / "a" / "b.bin"
    for bad in (
        {"path": "../../../etc/passwd"},
        {"path": "/etc/passwd"},
        {"path": "a//b"},
        {"revision": ".."},
        {"tenant": ".."},
        {"repo_id": "org/.."},
        {"path": "a\\..\\b"},
    ):
        with pytest.raises(UnsafePath):
            destination(work, item(**bad))
    # A symlink inside the storage that points outside it does not let a file escape.
    (work / "acme").mkdir()
    os.symlink("/tmp", work / "acme" / "org")
    with pytest.raises(UnsafePath):
        destination(work, item())
    # A link planted under a file's partial name, symbolic or hard, is not written through: the
    # partial is truncated once opened (both byte paths open it the same way), so it is made anew.
    os.unlink(work / "acme" / "org")
    place = placement(work, item())
    partial = place.partial
    partial.parent.mkdir(parents=True)
    precious = work / "precious.bin"
    for plant in (os.symlink, os.link):
        precious.write_bytes(b"keep me")
        plant(precious, partial)
        fd = open_partial(place)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, b"new")
        finally:
            os.close(fd)
        info = partial.lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and partial.read_bytes() == b"new"
        assert precious.read_bytes() == b"keep me", plant
        partial.unlink()
    assert (
        file_url("http://hub/", item(revision="refs/pr/1", path="dir/a b.bin"))
        == "http://hub/org/model/resolve/refs%2Fpr%2F1/dir/a%20b.bin"
    )


def test_the_executor_needs_a_token_and_a_storage_directory_and_stops_on_a_refused_token(api, hub, work):
    env = server.serve_env(None)
    result = subprocess.run(
        [sys.executable, "-m", "app", "executor", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "DLW_EXECUTOR_TOKEN" in result.stderr and "DLW_EXECUTOR_STORAGE" in result.stderr
    # A token the API refuses (here: a viewer's) stops the executor with exit code 3.
    env = server.serve_env(None, DLW_EXECUTOR_TOKEN=token(1, "tenant_viewer"), DLW_EXECUTOR_BASE_URL=api)
    result = subprocess.run(
        [sys.executable, "-m", "app", "executor", "run", "--storage", str(work), "--hf-endpoint", hub.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3, result.stderr
    assert "refuses this executor's token" in result.stderr


@contextmanager
def largest_files_seen(storage: Path) -> Iterator[dict[str, int]]:
    """While the block runs, the largest size each file under storage reached (polled every
    few milliseconds: temporary files included), by its path relative to storage."""
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in storage.rglob("*"):
                try:
                    size = path.stat().st_size if path.is_file() else None
                except FileNotFoundError:
                    continue
                if size is not None:
                    name = str(path.relative_to(storage))
                    seen[name] = max(seen.get(name, 0), size)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join(5)


def quota_used(api: str, tid: int) -> int:
    return int(quota_of(api, tid)["bytes_used_month"])


def create_one_file_tasks(
    api: str,
    hub: HubServer,
    tid: int,
    repo: str,
    content: bytes,
    declared: int,
    cases: dict[str, str | None],
    announced: str,
) -> dict[str, str]:
    """One task per path of cases (path: its sha256, or None), each of one file declared
    `declared` bytes long and served as `content`; the server announces the length of `announced`
    only. Returns the task ids by path."""
    task_ids = {}
    for path, digest in cases.items():
        hub.add(repo, "main", path, content)
        if path != announced:
            hub.unannounced.add(path)
        spec = {"path": path, "size": declared, **({"sha256": digest} if digest else {})}
        created = create_task(api, tid, repo, "main", [spec])
        assert created.status_code == 201, created.text
        task_ids[path] = created.json()["id"]
    return task_ids


def run_until_failed(api: str, hub: HubServer, storage: Path, label: str, tid: int, task_ids: dict[str, str]) -> str:
    """An executor (three downloads at once) runs until every task has failed, then stops cleanly;
    returns its log."""
    executor = start_executor(api, hub, storage, label, "--concurrency", "3")
    try:
        for task_id in task_ids.values():
            wait_for(lambda t=task_id: task_of(api, tid, t)["status"] == "failed", 60, task_id, (executor,))
    finally:
        code, err = stop_executor(executor)
    assert code == 0, err
    return err


def test_one_byte_files_served_as_5_mb_fail_and_the_quota_holds(db, api, hub, work):
    """The attack as reported: tasks declaring 1-byte files, admitted under a 1,000-byte monthly
    quota, pulled 5 MB each through the executor and were counted so. The declared size is a
    promise: one byte more fails the file (not retryable), nothing past it reaches the disk, and
    nothing is counted. The server announces the length, hides it, or the task has no sha256."""
    tid = provision(db, "e2e-oversize", bytes_month=1000)
    content = random.Random(8).randbytes(5_000_000)
    sha = hashlib.sha256(content).hexdigest()
    cases = {"announced.bin": sha, "unannounced.bin": sha, "no-sha.bin": None}
    for path in ("unannounced.bin", "no-sha.bin"):
        hub.slow[path] = 0.05  # ~4 s for all of it: time enough to see it is not read
    task_ids = create_one_file_tasks(api, hub, tid, "org/liar", content, 1, cases, announced="announced.bin")

    storage = work / "storage"
    with largest_files_seen(storage) as seen:
        run_until_failed(api, hub, storage, "liar", tid, task_ids)

    for path, task_id in task_ids.items():
        task = task_of(api, tid, task_id)
        assert task["error"].startswith(f"{path}: server sent more than the declared 1 bytes"), task
        (file,) = task["files"]
        assert (file["status"], file["attempts"], file["bytes_done"]) == ("failed", 1, 0)  # not retried
        assert hub.sent[path] < len(content), path  # the executor stopped reading
    # Nothing past the declared size was ever on disk, and nothing is left.
    assert max(seen.values(), default=0) <= 1, seen  # (a file may live too briefly to be seen at all)
    assert not [p for p in storage.rglob("*") if p.is_file()]
    # Nothing was counted: the month is untouched, and a task of the whole quota is admitted.
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.usage_records WHERE tenant_id = %s", (tid,)).fetchone()[0] == 0
    assert quota_used(api, tid) == 0
    assert create_task(api, tid, "org/liar", "main", [{"path": "honest.bin", "size": 1000}]).status_code == 201


def test_a_server_sending_fewer_bytes_than_declared_fails_the_file(db, api, hub, work):
    """Content that matches its sha256 but is shorter than declared is not the declared file:
    the file fails (not retryable) and nothing is counted, with or without a sha256."""
    tid = provision(db, "e2e-short")
    content = random.Random(9).randbytes(3 * CHUNK)
    sha = hashlib.sha256(content).hexdigest()
    declared = len(content) + 1
    cases = {"short-announced.bin": sha, "short-unannounced.bin": sha, "short-no-sha.bin": None}
    task_ids = create_one_file_tasks(
        api, hub, tid, "org/short", content, declared, cases, announced="short-announced.bin"
    )

    storage = work / "storage"
    log = run_until_failed(api, hub, storage, "short", tid, task_ids)
    for path, task_id in task_ids.items():
        # Failure lines name the file as success lines do: tenant/repo@revision:path.
        assert f"e2e-short/org/short@main:{path}: server sent fewer than the declared" in log, log
        task = task_of(api, tid, task_id)
        assert task["error"].startswith(f"{path}: server sent fewer than the declared {declared} bytes"), task
        assert [(f["status"], f["attempts"]) for f in task["files"]] == [("failed", 1)]
    assert not [p for p in storage.rglob("*") if p.is_file()]
    assert quota_used(api, tid) == 0


def test_the_download_stops_at_the_declared_size_and_never_writes_past_it(hub, work):
    """The reference executor's download itself, against the file server: after every write the
    temporary file is at most the declared size; one byte more ends the transfer, and the
    temporary file is removed."""
    content = random.Random(10).randbytes(80 * CHUNK)
    hub.add("org/cut", "main", "long.bin", content)
    hub.unannounced.add("long.bin")
    hub.slow["long.bin"] = 0.01
    declared = 5 * CHUNK + 123
    item = Claimed("f", "acme", "org/cut", "main", "long.bin", declared, None, "tok", 60)
    tmp = partial_path(work, item)
    sizes: list[int] = []
    counted: list[int] = []

    def after_write(n: int) -> None:
        counted.append(n)
        sizes.append(tmp.stat().st_size)
        assert sizes[-1] <= declared

    async def fetch() -> None:
        await download(work, hub.url, item, {}, Tuning(), after_write)

    with pytest.raises(WrongSize, match=f"^server sent more than the declared {declared} bytes$"):
        asyncio.run(fetch())
    assert sizes and max(sizes) <= declared and sum(counted) == max(sizes)
    assert not tmp.exists()
    assert hub.sent["long.bin"] < len(content)
