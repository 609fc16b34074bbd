"""Database connection faults through a real server: committed work is never answered 500.

A thread terminates the API's pooled backends (pg_terminate_backend, as superuser) every 0.3 s
while clients create tasks with Idempotency-Keys. Whatever a termination hits (the acquire, a
statement, the COMMIT, the reset on release), the answer is the committed result or a 503 with
Retry-After; a 503'd key retried afterwards returns its task if it was made, and never makes a
second one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.support import server
from tests.support.app import bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

KEYS = 200
QUOTA = 150  # fewer than KEYS: admission refuses the rest, and must not over-admit
WORKERS = 16
KILL_EVERY = 0.3
TERMINATE = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE application_name = 'dlw-api' AND datname = current_database()"
)


def _body(i: int) -> dict[str, Any]:
    return {"repo_id": "org/model", "revision": f"r{i}", "files": [{"path": "a.bin", "size": 10}]}


class Killer(threading.Thread):
    def __init__(self, db: MigratedDb) -> None:
        super().__init__(daemon=True)
        self.db, self.stopped, self.terminated, self.rounds = db, threading.Event(), 0, 0

    def run(self) -> None:
        with self.db.owner() as conn:
            while not self.stopped.wait(KILL_EVERY):
                row = conn.execute(TERMINATE).fetchone()
                self.terminated += int(row[0]) if row else 0
                self.rounds += 1


async def _load(base: str, headers: dict[str, str], keys: list[int]) -> dict[int, list[httpx.Response | str]]:
    """Each key's answers, first attempt only (what the clients saw under the faults)."""
    answers: dict[int, list[httpx.Response | str]] = {k: [] for k in keys}
    queue = list(keys)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:

        async def worker() -> None:
            while queue:
                key = queue.pop()
                try:
                    answers[key].append(
                        await http.post(
                            "/api/v1/tasks", headers={**headers, "Idempotency-Key": f"k{key}"}, json=_body(key)
                        )
                    )
                except httpx.TransportError as exc:  # a reset connection is an answer the client never got
                    answers[key].append(repr(exc))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return answers


async def _retry(base: str, headers: dict[str, str], keys: list[int]) -> dict[int, httpx.Response]:
    """The final answer of each key, retried with the same key and body until it is not a 503."""
    final: dict[int, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for key in keys:
            for _ in range(20):
                response = await http.post(
                    "/api/v1/tasks", headers={**headers, "Idempotency-Key": f"k{key}"}, json=_body(key)
                )
                if response.status_code != 503:
                    final[key] = response
                    break
                await asyncio.sleep(0.2)
    return final


def test_terminated_backends_never_turn_committed_creates_into_500s(db: MigratedDb, tmp_path: Path):
    tid = tenant(db, "faults", concurrent=QUOTA)
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 0 WHERE tenant_id = %s", (tid,))
    headers = bearer(token(tid, "tenant_operator"))
    log = tmp_path / "server.log"
    with server.running_server(db, log=log, DLW_QUOTA_LOCK_TIMEOUT_MS="30000") as base:
        killer = Killer(db)
        killer.start()
        started = time.monotonic()
        try:
            first = asyncio.run(_load(base, headers, list(range(KEYS))))
        finally:
            killer.stopped.set()
            killer.join()
        seconds = time.monotonic() - started
        seen = [a for answers in first.values() for a in answers]
        codes = Counter(a.status_code if isinstance(a, httpx.Response) else "reset" for a in seen)
        unavailable = [
            k
            for k, answers in first.items()
            if any(not isinstance(a, httpx.Response) or a.status_code == 503 for a in answers)
        ]
        final = asyncio.run(_retry(base, headers, unavailable))
        quota = httpx.get(f"{base}/api/v1/quota/current", headers=headers, timeout=30).json()
    server_log = log.read_text()
    retried = dict(Counter(r.status_code for r in final.values()))
    print(
        f"\nfaults: {len(seen)} requests in {seconds:.1f} s, {dict(codes)}, {killer.terminated} backends terminated"
        f" in {killer.rounds} rounds; {len(unavailable)} keys retried -> {retried};"
        f" {server_log.count('connection reset after the transaction failed')} resets after COMMIT,"
        f" {server_log.count('COMMIT_UNCERTAIN')} uncertain commits logged"
    )
    assert killer.terminated > 0
    # No 500 and no reset connection: every answer is the committed result, a refusal or a 503.
    assert set(codes) <= {201, 429, 503}, codes
    for answers in first.values():
        for a in answers:
            if isinstance(a, httpx.Response) and a.status_code == 503:
                assert a.headers.get("Retry-After") and a.json()["detail"]["code"] in {
                    "DB_UNAVAILABLE",
                    "COMMIT_UNCERTAIN",
                }
    assert set(final) == set(unavailable), "a retried key never got past 503 after the faults stopped"
    assert {r.status_code for r in final.values()} <= {200, 201, 429}

    answered: dict[int, str] = {}  # key -> the task id the API answered for it
    for key, answers in first.items():
        for a in answers:
            if isinstance(a, httpx.Response) and a.status_code == 201:
                answered[key] = a.json()["id"]
    for key, response in final.items():
        if response.status_code in (200, 201):
            assert key not in answered or answered[key] == response.json()["id"]
            answered[key] = response.json()["id"]
    with db.owner() as conn:
        tasks = conn.execute(
            "SELECT t.id::text, k.key FROM dlw.tasks t LEFT JOIN dlw.idempotency_keys k"
            " ON k.tenant_id = t.tenant_id AND k.task_id = t.id WHERE t.tenant_id = %s",
            (tid,),
        ).fetchall()
    in_db = {task_id: key for task_id, key in tasks}
    # Every task the database holds was answered (at once, or on its key's retry), exactly once.
    assert len(tasks) == len(in_db) == len(set(in_db.values()))
    assert sorted(in_db) == sorted(answered.values())
    assert all(in_db[task_id] == f"k{key}" for key, task_id in answered.items())
    # Admission held: exactly the quota admitted, and the quota figures count what exists.
    assert len(in_db) == QUOTA
    assert quota["concurrent_tasks"] == QUOTA
    assert "Traceback" not in server_log and "Exception in ASGI application" not in server_log


def test_a_pool_acquire_timeout_is_503_not_500(db: MigratedDb):
    """The pool's one connection is held by a create waiting for its quota lock: the next
    request gives up after DLW_DB_ACQUIRE_TIMEOUT_SECONDS with 503 DB_UNAVAILABLE."""
    tid = tenant(db, "busy-pool")
    headers = bearer(token(tid, "tenant_operator"))
    settings = {
        "DLW_DB_POOL_MIN_SIZE": "1",
        "DLW_DB_POOL_MAX_SIZE": "1",
        "DLW_DB_ACQUIRE_TIMEOUT_SECONDS": "0.5",
        "DLW_QUOTA_LOCK_TIMEOUT_MS": "30000",
    }
    with server.running_server(db, **settings) as base, db.owner() as holder:
        holder.autocommit = False
        holder.execute("SELECT dlw.lock_tenant_quota_rows(%s)", (tid,))  # the tenant's quota lock, held
        created: list[httpx.Response] = []
        url = f"{base}/api/v1/tasks"
        creator = threading.Thread(
            target=lambda: created.append(httpx.post(url, headers=headers, json=_body(0), timeout=60))
        )
        creator.start()
        with db.owner() as watcher:
            deadline = time.monotonic() + 30
            while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dlw-api' AND wait_event_type = 'Lock'"
            ).fetchone() == (1,):
                assert time.monotonic() < deadline, "the create never waited for the quota lock"
                time.sleep(0.05)
        busy = httpx.get(f"{base}/api/v1/quota/current", headers=headers, timeout=30)
        holder.rollback()
        creator.join(60)
    assert busy.status_code == 503 and busy.json()["detail"]["code"] == "DB_UNAVAILABLE", busy.text
    assert busy.headers["Retry-After"] == "2"
    assert [r.status_code for r in created] == [201]
