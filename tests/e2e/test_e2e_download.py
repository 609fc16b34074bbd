"""End to end with real processes: the API server (`dlw serve`), a local Hugging Face-compatible
file server (tests/support/hub_server.py) and reference executors (`dlw executor run`). Tasks of
several tenants are downloaded and verified on disk, usage is folded and shown by the quota API,
the byte quota then refuses the next task; an executor stopped by SIGTERM gives its file back,
one killed mid-download loses its lease and another downloads the file again, counted once.
What the executor refuses and declared sizes: tests/e2e/test_e2e_download_limits.py."""

from __future__ import annotations

import hashlib
import random
import signal
import time
from typing import Any

import httpx

from tests.support.app import bearer, detail, token
from tests.support.database import MigratedDb, free_port
from tests.support.executors import create_task, quota_of, start_executor, stop_executor, task_of, wait_for
from tests.support.hub_server import CHUNK, api, hub, provision

__all__ = ["api", "hub"]  # shared fixtures (tests/support/hub_server.py)


def executor_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_several_tenants_downloaded_by_two_executors_metered_and_limited(db, api, hub, work):
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

    storage = work / "storage"
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


def test_stopped_and_killed_executors_lose_their_leases_and_the_file_is_downloaded_again(db, api, hub, work):
    tid = provision(db, "e2e-killed")
    spec = hub.add("org/slow", "main", "big.bin", random.Random(7).randbytes(40 * CHUNK))
    hub.slow["big.bin"] = 0.05  # ~2 s for the whole file
    created = create_task(api, tid, "org/slow", "main", [spec])
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    file_id = task_of(api, tid, task_id)["files"][0]["id"]
    storage = work / "storage"

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


def test_a_small_file_whose_task_is_cancelled_stops_and_the_rest_of_its_batch_goes_on(db, api, hub, work):
    """The small files of one claim go through the lane as one batch (app/executor/small_files.py):
    when the task of one of them is cancelled mid-download, the batch's heartbeat hears
    LEASE_LOST, that file's transfer stops and its partial file goes, while the other file of
    the same claim is downloaded and completed."""
    tid = provision(db, "e2e-lost")
    slow = hub.add("org/lost", "main", "slow.bin", random.Random(8).randbytes(40 * CHUNK))
    hub.slow["slow.bin"] = 0.1  # ~4 s for the whole file
    fast = hub.add("org/kept", "main", "fast.bin", random.Random(9).randbytes(CHUNK))
    cancelled = create_task(api, tid, "org/lost", "main", [slow]).json()["id"]
    kept = create_task(api, tid, "org/kept", "main", [fast]).json()["id"]
    file_id = task_of(api, tid, cancelled)["files"][0]["id"]
    partial = work / "storage" / "e2e-lost" / "org" / "lost" / "main" / f".slow.bin.{file_id}.part"
    # Both files in the executor's first claim, so in one batch.
    executor = start_executor(api, hub, work / "storage", "lost", "--progress-seconds", "0.2")
    try:
        wait_for(lambda: hub.sent["slow.bin"] > 0, 20, "the slow download to start", (executor,))
        wait_for(lambda: task_of(api, tid, kept)["status"] == "succeeded", 20, "the other file", (executor,))
        assert partial.exists()
        answer = httpx.post(
            f"{api}/api/v1/tasks/{cancelled}/cancel", headers=bearer(token(tid, "tenant_operator")), timeout=10
        )
        assert answer.status_code == 202, answer.text
        wait_for(lambda: not partial.exists(), 20, "the partial file to go", (executor,))
        sent = hub.sent["slow.bin"]
        time.sleep(0.5)
        assert hub.sent["slow.bin"] <= sent + CHUNK  # the transfer stopped (a chunk may be on its way)
        assert sent < slow["size"]
    finally:
        code, err = stop_executor(executor)
    assert code == 0, err
    assert "lease lost" in err
    assert task_of(api, tid, cancelled)["status"] == "cancelled"
    kept_file = work / "storage" / "e2e-lost" / "org" / "kept" / "main" / "fast.bin"
    assert hashlib.sha256(kept_file.read_bytes()).hexdigest() == fast["sha256"]
