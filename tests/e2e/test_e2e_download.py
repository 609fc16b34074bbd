"""End to end with real processes: the API server (`dlw serve`), a local Hugging Face-compatible
file server written here (generated files with known sha256, optionally slow), and reference
executors (`dlw executor run`). Tasks of several tenants are downloaded and verified on disk,
usage is folded and shown by the quota API, the byte quota then refuses the next task; an
executor stopped by SIGTERM gives its file back, one killed mid-download loses its lease and
another downloads the file again, counted once; a server that sends more or fewer bytes than
declared fails the file, and the executor never writes past the declared size."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from app.executor.client import Claimed
from app.executor.download import Tuning, UnsafePath, WrongSize, destination, download, file_url, partial_path
from tests.support import server
from tests.support.app import detail, token
from tests.support.database import MigratedDb, free_port
from tests.support.executors import create_task, quota_of, start_executor, stop_executor, task_of, wait_for
from tests.support.file_server import serve_in_thread
from tests.support.tenants import tenant

CHUNK = 64 * 1024


@dataclass
class HubServer:
    """Serves {repo_id}/resolve/{revision}/{path} like the Hugging Face hub; counts requests and
    the bytes sent per path; `slow[path]` seconds of sleep between 64 KiB chunks; paths in
    `unannounced` are sent without Content-Length (the body ends when the connection closes)."""

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    unannounced: set[str] = field(default_factory=set)
    requests: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)

    def add(self, repo: str, revision: str, path: str, content: bytes) -> dict[str, Any]:
        self.files[(repo, revision, path)] = content
        return {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = self.path.split("?", 1)[0].split("/")
                # /{org}/{name}/resolve/{revision}/{path...}
                if len(parts) < 6 or parts[3] != "resolve":
                    self.send_error(404)
                    return
                repo, revision, path = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
                content = hub.files.get((repo, revision, path))
                hub.requests[path] += 1
                if content is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if path in hub.unannounced:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                try:
                    for offset in range(0, len(content), CHUNK):
                        self.wfile.write(content[offset : offset + CHUNK])
                        self.wfile.flush()
                        hub.sent[path] += len(content[offset : offset + CHUNK])
                        if path in hub.slow:
                            time.sleep(hub.slow[path])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory (not pytest's tmp_path: concurrent pytest runs prune each other's)."""
    path = Path(tempfile.mkdtemp(prefix="dlw-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    h = HubServer()
    h.start()
    yield h
    h.close()


@pytest.fixture(scope="module")
def api(db: MigratedDb) -> Iterator[str]:
    with server.running_server(db, DLW_SNAPSHOT_INTERVAL_SECONDS="1") as url:
        yield url


def provision(db: MigratedDb, slug: str, bytes_month: int = 0) -> int:
    return tenant(db, slug, concurrent=0, bytes_month=bytes_month, storage_gb=0)


def executor_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_several_tenants_downloaded_by_two_executors_metered_and_limited(db, api, hub, workdir):
    rng = random.Random(6)
    plan = {
        "e2e-alpha": [("org/alpha", "main", ["config.json", "model-00001.safetensors", "model-00002.safetensors"])],
        "e2e-beta": [("org/beta", "v1.0", ["tokenizer.json", "sub/dir/weights.bin", "empty.txt"])],
        "e2e-gamma": [("team/gamma", "refs/pr/1", ["README.md", "data/train.parquet"]), ("org/alpha", "main", ["x"])],
    }
    tasks: list[tuple[int, str, str, list[dict[str, Any]]]] = []
    totals: dict[str, int] = {}
    for slug, repos in plan.items():
        specs_by_repo = []
        for repo, revision, paths in repos:
            specs = [
                hub.add(repo, revision, path, b"" if path == "empty.txt" else rng.randbytes(rng.randint(1, 600_000)))
                for path in paths
            ]
            specs_by_repo.append((repo, revision, specs))
        totals[slug] = sum(f["size"] for _, _, specs in specs_by_repo for f in specs)
        # alpha's monthly byte quota is exactly what it downloads.
        tid = provision(db, slug, bytes_month=totals[slug] if slug == "e2e-alpha" else 0)
        for repo, revision, specs in specs_by_repo:
            created = create_task(api, tid, repo, revision, specs)
            assert created.status_code == 201, created.text
            tasks.append((tid, slug, created.json()["id"], specs))

    storage = workdir / "storage"
    ports = [free_port(), free_port()]
    executors = [
        start_executor(api, hub, storage, f"exec-{i}", "--concurrency", "2", "--metrics-port", str(ports[i - 1]))
        for i in (1, 2)
    ]
    try:
        for tid, _, task_id, _ in tasks:
            wait_for(lambda tid=tid, task_id=task_id: task_of(api, tid, task_id)["status"] == "succeeded", 60, task_id)

        # Each executor's own metrics (--metrics-port): together they downloaded every byte and file once.
        # (Polled: an executor counts a file just after the API has recorded it.)
        def counted() -> tuple[float, float]:
            scraped = [executor_metrics(port) for port in ports]
            done = ("dlw_executor_files_total", (("outcome", "succeeded"),))
            return (
                sum(m.get(("dlw_executor_downloaded_bytes_total", ()), 0) for m in scraped),
                sum(m.get(done, 0) for m in scraped),
            )

        expected = (sum(totals.values()), sum(len(specs) for *_, specs in tasks))
        wait_for(lambda: counted() == expected, 10, f"executor metrics (bytes, files) == {expected}")
    finally:
        codes = [stop_executor(proc) for proc in executors]
    assert [code for code, _ in codes] == [0, 0], codes  # SIGTERM: a clean stop

    # Every file is on disk where it belongs, with its sha256; no temporary file is left.
    for tid, slug, task_id, specs in tasks:
        task = task_of(api, tid, task_id)
        for spec in specs:
            on_disk = storage / slug / task["repo_id"] / task["revision"] / spec["path"]
            assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == spec["sha256"], on_disk
        assert {f["status"] for f in task["files"]} == {"succeeded"}
        assert {f["path"]: f["bytes_done"] for f in task["files"]} == {s["path"]: s["size"] for s in specs}
    assert not [p for p in storage.rglob("*.part")]

    # After a refresh (the API leader runs one every second here) the quota shows exactly the
    # downloaded bytes, all of it folded into the snapshot.
    with db.owner() as conn:
        newest = conn.execute("SELECT max(xid)::text::bigint FROM dlw.usage_records").fetchone()[0]
    wait_for(lambda: _folded_past(db, newest), 15, "a snapshot refresh")
    for tid, slug, _, _ in tasks:
        quota = quota_of(api, tid)
        assert quota["bytes_used_month"] == totals[slug], slug
        assert quota["snapshot_refreshed_at"] is not None
        with db.owner() as conn:
            folded = conn.execute(
                "SELECT amount FROM dlw.quota_snapshots WHERE tenant_id = %s AND period = dlw.month_start(now())",
                (tid,),
            ).fetchone()[0]
        assert folded == totals[slug], slug
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.quota_drift()").fetchone()[0] == 0

    # alpha has used its whole month: the next task is refused for bytes_month.
    alpha = tasks[0][0]
    refused = create_task(api, alpha, "org/alpha", "main", [{"path": "more.bin", "size": 1}])
    assert refused.status_code == 429
    assert detail(refused) == {"code": "QUOTA_EXCEEDED", "metric": "bytes_month"}


def _folded_past(db: MigratedDb, xid: int) -> bool:
    with db.owner() as conn:
        return bool(
            conn.execute("SELECT folded_below::text::bigint > %s FROM dlw.snapshot_state", (xid,)).fetchone()[0]
        )


def _file(db: MigratedDb, file_id: str) -> dict[str, Any]:
    with db.owner() as conn:
        row = conn.execute(
            "SELECT status, attempts, executor_id, assignment_token IS NOT NULL, bytes_done FROM dlw.task_files"
            " WHERE id = %s",
            (file_id,),
        ).fetchone()
    return dict(zip(("status", "attempts", "executor", "has_token", "bytes_done"), row, strict=True))


def test_stopped_and_killed_executors_lose_their_leases_and_the_file_is_downloaded_again(db, api, hub, workdir):
    tid = provision(db, "e2e-killed")
    spec = hub.add("org/slow", "main", "big.bin", random.Random(7).randbytes(40 * CHUNK))
    hub.slow["big.bin"] = 0.05  # ~2 s for the whole file
    created = create_task(api, tid, "org/slow", "main", [spec])
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    file_id = task_of(api, tid, task_id)["files"][0]["id"]
    storage = workdir / "storage"

    # SIGTERM mid-download: the executor gives the file back at once (no attempt used) and exits 0.
    first = start_executor(api, hub, storage, "stopped", "--lease-seconds", "5")
    wait_for(lambda: hub.sent["big.bin"] > 0, 20, "the first download to start", (first,))
    code, err = stop_executor(first)
    assert code == 0, err
    assert _file(db, file_id) == {
        "status": "pending",
        "attempts": 0,
        "executor": "e2e-executor/stopped",
        "has_token": False,
        "bytes_done": 0,
    }

    # SIGKILL mid-download: nothing is given back; the lease expires (5 s) and another executor
    # downloads the file again.
    sent_before = hub.sent["big.bin"]
    killed = start_executor(api, hub, storage, "killed", "--lease-seconds", "5")
    wait_for(lambda: hub.sent["big.bin"] > sent_before, 20, "the second download to start", (killed,))
    stop_executor(killed, signal.SIGKILL)
    assert _file(db, file_id)["status"] in ("assigned", "running")
    survivor = start_executor(api, hub, storage, "survivor", "--lease-seconds", "5")
    try:
        wait_for(
            lambda: task_of(api, tid, task_id)["status"] == "succeeded", 30, "the survivor's download", (survivor,)
        )
    finally:
        code, err = stop_executor(survivor)
    assert code == 0, err

    final = _file(db, file_id)
    assert final == {
        "status": "succeeded",
        "attempts": 2,
        "executor": "e2e-executor/survivor",
        "has_token": True,
        "bytes_done": spec["size"],
    }
    assert hub.requests["big.bin"] == 3
    target = storage / "e2e-killed" / "org" / "slow" / "main" / "big.bin"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == spec["sha256"]
    # Counted once, for the declared size (which is what was downloaded).
    with db.owner() as conn:
        rows = conn.execute("SELECT event_key, amount FROM dlw.usage_records WHERE tenant_id = %s", (tid,)).fetchall()
    assert rows == [(f"file:{file_id}", spec["size"])]
    # Only the killed executor's partial file can be left behind (the stopped one cleaned up).
    assert len([p for p in target.parent.iterdir() if p.name.endswith(".part")]) <= 1


def test_the_executor_refuses_to_write_outside_its_storage(workdir):
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

    assert destination(workdir, item()) == workdir.resolve() / "acme" / "org" / "model" / "main" / "a" / "b.bin"
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
            destination(workdir, item(**bad))
    # A symlink inside the storage that points outside it does not let a file escape.
    (workdir / "acme").mkdir()
    os.symlink("/tmp", workdir / "acme" / "org")
    with pytest.raises(UnsafePath):
        destination(workdir, item())
    assert (
        file_url("http://hub/", item(revision="refs/pr/1", path="dir/a b.bin"))
        == "http://hub/org/model/resolve/refs%2Fpr%2F1/dir/a%20b.bin"
    )


def test_the_executor_needs_a_token_and_a_storage_directory_and_stops_on_a_refused_token(api, hub, workdir):
    env = server.serve_env(None)
    result = subprocess.run(
        [sys.executable, "-m", "app", "executor", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "DLW_EXECUTOR_TOKEN" in result.stderr and "DLW_EXECUTOR_STORAGE" in result.stderr
    # A token the API refuses (here: a viewer's) stops the executor with exit code 3.
    env = server.serve_env(None, DLW_EXECUTOR_TOKEN=token(1, "tenant_viewer"), DLW_EXECUTOR_BASE_URL=api)
    result = subprocess.run(
        [sys.executable, "-m", "app", "executor", "run", "--storage", str(workdir), "--hf-endpoint", hub.url],
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


def test_one_byte_files_served_as_5_mb_fail_and_the_quota_holds(db, api, hub, workdir):
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

    storage = workdir / "storage"
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


def test_a_server_sending_fewer_bytes_than_declared_fails_the_file(db, api, hub, workdir):
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

    storage = workdir / "storage"
    log = run_until_failed(api, hub, storage, "short", tid, task_ids)
    for path, task_id in task_ids.items():
        # Failure lines name the file as success lines do: tenant/repo@revision:path.
        assert f"e2e-short/org/short@main:{path}: server sent fewer than the declared" in log, log
        task = task_of(api, tid, task_id)
        assert task["error"].startswith(f"{path}: server sent fewer than the declared {declared} bytes"), task
        assert [(f["status"], f["attempts"]) for f in task["files"]] == [("failed", 1)]
    assert not [p for p in storage.rglob("*") if p.is_file()]
    assert quota_used(api, tid) == 0


def test_the_download_stops_at_the_declared_size_and_never_writes_past_it(hub, workdir):
    """The reference executor's download itself, against the file server: after every write the
    temporary file is at most the declared size; one byte more ends the transfer, and the
    temporary file is removed."""
    content = random.Random(10).randbytes(80 * CHUNK)
    hub.add("org/cut", "main", "long.bin", content)
    hub.unannounced.add("long.bin")
    hub.slow["long.bin"] = 0.01
    declared = 5 * CHUNK + 123
    item = Claimed("f", "acme", "org/cut", "main", "long.bin", declared, None, "tok", 60)
    tmp = partial_path(workdir, item)
    sizes: list[int] = []
    counted: list[int] = []

    def after_write(n: int) -> None:
        counted.append(n)
        sizes.append(tmp.stat().st_size)
        assert sizes[-1] <= declared

    async def fetch() -> None:
        await download(workdir, hub.url, item, {}, Tuning(), after_write)

    with pytest.raises(WrongSize, match=f"^server sent more than the declared {declared} bytes$"):
        asyncio.run(fetch())
    assert sizes and max(sizes) <= declared and sum(counted) == max(sizes)
    assert not tmp.exists()
    assert hub.sent["long.bin"] < len(content)
