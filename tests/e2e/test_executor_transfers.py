"""The reference executor's transfers (issue 17): parallel byte ranges verified as one file,
resume from the server's checkpoint after a kill or a stop, and a corrupt range caught. A real
`dlw serve`, real `dlw executor run` processes and a file server that counts the bytes it sends."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.domain import RETRY_BACKOFF_BASE_SECONDS
from app.executor.client import Claimed
from app.executor.runner import ReferenceExecutor
from app.executor.settings import Config
from tests.support import server
from tests.support.app import token
from tests.support.database import MigratedDb
from tests.support.executors import create_task, start_executor, stop_executor, task_of, wait_for
from tests.support.file_server import FileServer, served_bytes
from tests.support.tenants import tenant

MB = 1 << 20


def provision(db: MigratedDb, slug: str) -> int:
    return tenant(db, slug, concurrent=0, bytes_month=0, storage_gb=0)


@pytest.fixture(scope="module")
def api(db: MigratedDb) -> Iterator[str]:
    with server.running_server(db, DLW_SNAPSHOT_INTERVAL_SECONDS="1") as url:
        yield url


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory (not pytest's tmp_path: concurrent pytest runs prune each other's)."""
    path = Path(tempfile.mkdtemp(prefix="dlw-xfer-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def files(workdir: Path) -> Iterator[tuple[FileServer, Path]]:
    fs = FileServer()
    fs.start()
    yield fs, workdir / "served"
    fs.close()


def _file_row(db: MigratedDb, file_id: str) -> dict[str, Any]:
    with db.owner() as conn:
        row = conn.execute(
            "SELECT status, resume_bytes, resume_sha256 FROM dlw.task_files WHERE id = %s", (file_id,)
        ).fetchone()
    return dict(zip(("status", "resume_bytes", "resume_sha256"), row, strict=True))


def _one_file_task(api: str, tid: int, repo: str, spec: dict[str, Any]) -> tuple[str, str]:
    created = create_task(api, tid, repo, "main", [spec])
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    return task_id, task_of(api, tid, task_id)["files"][0]["id"]


def _target(storage: Path, slug: str, repo: str, path: str) -> Path:
    return storage / slug / repo / "main" / path


def _run_until(
    api: str, fs: FileServer, storage: Path, label: str, tid: int, task_id: str, status: str, *args: str
) -> str:
    """One executor runs until the task reaches status, then stops cleanly; its log."""
    executor = start_executor(api, fs, storage, label, *args)
    try:
        wait_for(lambda: task_of(api, tid, task_id)["status"] == status, 120, f"the {label} download", (executor,))
    finally:
        code, log = stop_executor(executor)
    assert code == 0, log
    return log


def test_a_large_file_comes_in_parallel_ranges_and_is_verified_whole(db, api, files, workdir):
    fs, root = files
    tid = provision(db, "xfer-ranges")
    content = random.Random(17).randbytes(80 * MB + 12345)
    spec = fs.add(root, "org/ranges", "main", "big.bin", content)
    task_id, _ = _one_file_task(api, tid, "org/ranges", spec)
    storage = workdir / "storage"
    _run_until(api, fs, storage, "ranges", tid, task_id, "succeeded", "--connections-per-file", "4")
    assert fs.ranged["big.bin"] >= 8  # chunks of 1/16 of the file: many Range requests
    assert served_bytes(fs, "big.bin") == len(content)  # every byte once
    assert (
        hashlib.sha256(_target(storage, "xfer-ranges", "org/ranges", "big.bin").read_bytes()).hexdigest()
        == spec["sha256"]
    )


def test_a_corrupt_range_fails_the_file_and_leaves_nothing(db, api, files, workdir):
    fs, root = files
    tid = provision(db, "xfer-corrupt")
    content = random.Random(18).randbytes(40 * MB)
    spec = fs.add(root, "org/corrupt", "main", "big.bin", content)
    fs.corrupt_ranges.add("big.bin")  # every answer that starts past byte 0 has one flipped byte
    task_id, _ = _one_file_task(api, tid, "org/corrupt", spec)
    storage = workdir / "storage"
    _run_until(api, fs, storage, "corrupt", tid, task_id, "failed", "--connections-per-file", "4")
    task = task_of(api, tid, task_id)
    assert "sha256 mismatch" in task["error"], task
    assert fs.ranged["big.bin"] >= 1
    assert not [p for p in storage.rglob("*") if p.is_file()]  # neither the file nor a partial one


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_the_next_attempt_resumes_after_the_checkpoint(db, api, files, workdir, stop):
    """Killed at half the file (the lease then expires) or stopped (the file is released with its
    checkpoint): the next executor on the same storage verifies the partial file against the
    server's checkpoint and fetches only the rest: what the file server sends after the stop is
    the file after the checkpoint (give or take what was in flight to the stopped one)."""
    fs, root = files
    slug = f"xfer-resume-{stop.name.lower()}"
    tid = provision(db, slug)
    content = random.Random(19).randbytes(24 * MB)
    spec = fs.add(root, "org/resume", "main", "big.bin", content)
    fs.rate["big.bin"] = 8 * MB  # about 3 s for the file
    task_id, file_id = _one_file_task(api, tid, "org/resume", spec)
    storage = workdir / "storage"
    # Killed: the checkpoint is the last heartbeat's. Stopped: no heartbeat comes before the stop
    # (one every 20 s), so the server's checkpoint can only be the one the release carries.
    killed = stop == signal.SIGKILL
    beats = ("--lease-seconds", "5", "--progress-seconds", "0.2") if killed else ("--progress-seconds", "20")
    args = (*beats, "--connections-per-file", "1")

    first = start_executor(api, fs, storage, "first", *args)
    wait_for(lambda: served_bytes(fs, "big.bin") >= len(content) // 2, 60, "half the file", (first,))
    stop_executor(first, stop)
    at_stop = served_bytes(fs, "big.bin")
    checkpoint = _file_row(db, file_id)
    assert 0 < checkpoint["resume_bytes"] <= len(content) // 2 + 4 * MB, checkpoint
    assert checkpoint["resume_sha256"] == hashlib.sha256(content[: checkpoint["resume_bytes"]]).hexdigest()

    fs.rate.pop("big.bin")
    second = start_executor(api, fs, storage, "second", *args)
    try:
        wait_for(lambda: task_of(api, tid, task_id)["status"] == "succeeded", 60, "the resumed download", (second,))
    finally:
        code, log = stop_executor(second)
    assert code == 0, log
    assert f"resumed at byte {checkpoint['resume_bytes']}" in log
    again = served_bytes(fs, "big.bin") - at_stop
    assert len(content) - checkpoint["resume_bytes"] - MB <= again <= len(content) - checkpoint["resume_bytes"] + MB
    target = _target(storage, slug, "org/resume", "big.bin")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == spec["sha256"]
    assert _file_row(db, file_id) == {"status": "succeeded", "resume_bytes": 0, "resume_sha256": None}
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".part")]


def test_a_partial_file_that_no_longer_matches_is_discarded(db, api, files, workdir):
    """A partial file changed on disk after its checkpoint is not trusted: the download starts
    over and still ends verified."""
    fs, root = files
    tid = provision(db, "xfer-tampered")
    content = random.Random(20).randbytes(16 * MB)
    spec = fs.add(root, "org/tampered", "main", "big.bin", content)
    fs.rate["big.bin"] = 8 * MB
    task_id, file_id = _one_file_task(api, tid, "org/tampered", spec)
    storage = workdir / "storage"
    args = ("--lease-seconds", "5", "--progress-seconds", "0.2", "--connections-per-file", "1")

    first = start_executor(api, fs, storage, "first", *args)
    wait_for(lambda: _file_row(db, file_id)["resume_bytes"] > MB, 60, "a checkpoint", (first,))
    stop_executor(first, signal.SIGTERM)
    (partial,) = [p for p in storage.rglob("*.part")]
    with partial.open("r+b") as f:  # one byte inside the checkpointed prefix
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    sent_before = served_bytes(fs, "big.bin")

    fs.rate.pop("big.bin")
    second = start_executor(api, fs, storage, "second", *args)
    try:
        wait_for(lambda: task_of(api, tid, task_id)["status"] == "succeeded", 60, "the fresh download", (second,))
    finally:
        code, log = stop_executor(second)
    assert code == 0, log
    assert "resumed at byte" not in log
    assert served_bytes(fs, "big.bin") - sent_before == len(content)  # all of it again
    target = _target(storage, "xfer-tampered", "org/tampered", "big.bin")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == spec["sha256"]


def test_a_refusing_hub_is_retried_after_its_retry_after_and_the_backoff_by_any_executor(db, api, files, workdir):
    """The file endpoint answers 429 with Retry-After, then 503 without one, then the file. Two
    executors poll the queue all along (every 0.2 s), yet neither asks again before the wait the
    database keeps: the Retry-After (longer than attempt 1's backoff), then attempt 2's backoff."""
    fs, root = files
    tid = provision(db, "xfer-backoff")
    base = RETRY_BACKOFF_BASE_SECONDS
    retry_after = 2 * base + 1  # attempt 1's backoff is under 2 * base: only the Retry-After explains the wait
    spec = fs.add(root, "org/backoff", "main", "small.bin", random.Random(21).randbytes(4096))
    fs.refusals["small.bin"] = [(429, retry_after), (503, None)]
    storage = workdir / "storage"
    executors = (start_executor(api, fs, storage, "one"), start_executor(api, fs, storage, "two"))
    try:
        task_id, file_id = _one_file_task(api, tid, "org/backoff", spec)
        wait_for(lambda: task_of(api, tid, task_id)["status"] == "succeeded", 90, "the retried download", executors)
    finally:
        logs = [stop_executor(executor) for executor in executors]
    assert [code for code, _ in logs] == [0, 0], logs
    first, second, third = fs.request_times["small.bin"]
    assert second - first >= retry_after, (first, second, third)
    assert third - second >= 2 * base, (first, second, third)  # attempt 2 waits base * 2 at least
    with db.owner() as conn:
        attempts, not_before = conn.execute(
            "SELECT attempts, not_before FROM dlw.task_files WHERE id = %s", (file_id,)
        ).fetchone()
    assert (attempts, not_before) == (3, None)
    assert (
        hashlib.sha256(_target(storage, "xfer-backoff", "org/backoff", "small.bin").read_bytes()).hexdigest()
        == (spec["sha256"])
    )


@pytest.mark.parametrize(
    ("size", "connections", "rate"),
    [(16 * MB, "4", 3 * MB // 2), (2 * MB, "1", 3 * MB // 4)],
    ids=["ranged large file", "small file in the lane"],
)
def test_a_running_download_shows_its_bytes_in_the_task(db, api, files, workdir, size, connections, rate):
    """Heartbeats carry progress: while the file comes (about 3 s, throttled), GET /tasks/{id}
    shows its bytes_done growing, for a large file's parallel ranges and for a small file of a
    batch through the lane alike."""
    fs, root = files
    slug = f"xfer-progress-{size}"
    tid = provision(db, slug)
    spec = fs.add(root, "org/progress", "main", "f.bin", random.Random(22).randbytes(size))
    fs.rate["f.bin"] = rate  # per connection
    task_id, _ = _one_file_task(api, tid, "org/progress", spec)
    args = ("--progress-seconds", "0.3", "--connections-per-file", connections)
    executor = start_executor(api, fs, workdir / "storage", "progress", *args)
    seen: list[int] = []
    try:

        def finished() -> bool:
            task = task_of(api, tid, task_id)
            seen.append(task["files"][0]["bytes_done"])
            return task["status"] == "succeeded"

        wait_for(finished, 60, "the throttled download", (executor,))
    finally:
        code, log = stop_executor(executor)
    assert code == 0, log
    during = sorted(set(n for n in seen if 0 < n < size))
    assert len(during) >= 3, seen  # at least three distinct counts while it ran, about one a heartbeat
    assert seen == sorted(seen) and seen[-1] == size  # never backwards, all of it at the end


class LaneClosesUnderItsBatch(ReferenceExecutor):
    """A real executor whose small-file lane closes after a claim handed it a batch and before
    the batch submits a file: what a lane that breaks between the two does to it."""

    batches = 0

    async def _work_batch(self, items: list[Claimed]) -> None:
        assert self.tuning.lane is not None
        self.batches += 1
        await asyncio.to_thread(self.tuning.lane.close)
        await super()._work_batch(items)


def test_a_batch_whose_lane_closed_still_downloads_every_file_the_per_file_way(db, api, files, workdir):
    fs, root = files
    tid = provision(db, "xfer-lane-gone")
    specs = [fs.add(root, "org/lane-gone", "main", f"s{i}.bin", random.Random(i).randbytes(2048)) for i in range(6)]
    created = create_task(api, tid, "org/lane-gone", "main", specs)
    assert created.status_code == 201, created.text
    storage = workdir / "storage"
    executor = LaneClosesUnderItsBatch(
        Config(
            base_url=api,
            token=token(0, "executor", user_id="e2e-executor"),
            storage=storage,
            hf_endpoint=fs.url,
            poll_seconds=0.2,
            label="lane-gone",
        ),
        progress="off",
    )

    async def until_done() -> tuple[int, str]:
        run = asyncio.create_task(executor.run())
        try:
            for _ in range(300):
                status = await asyncio.to_thread(lambda: str(task_of(api, tid, created.json()["id"])["status"]))
                if status in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.1)
        finally:
            executor.stop()
        return await run, status

    assert asyncio.run(asyncio.wait_for(until_done(), 60)) == (0, "succeeded")
    assert executor.batches == 1 and executor.tuning.lane is not None and not executor.tuning.lane.usable
    for spec in specs:
        target = _target(storage, "xfer-lane-gone", "org/lane-gone", spec["path"])
        assert hashlib.sha256(target.read_bytes()).hexdigest() == spec["sha256"]
        assert fs.requests[spec["path"]] == 1  # each fetched once, by the per-file path
