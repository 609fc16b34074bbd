"""Long-poll claims (app/api/queue_wakeup.py): `wait_seconds` makes an empty claim wait for work
on the server. Two real `dlw serve` instances on one database: a task created through either
wakes a claim waiting on the other (NOTIFY on the listening connection) long before its wait
ends; a wait with nothing to claim ends empty once it is over; a NOTIFY anyone sends only makes
the claim look again; the bound is refused past CLAIM_WAIT_SECONDS_MAX; an executor whose API is unreachable does not
turn its waiting claim into a busy loop."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest

from app.domain import CLAIM_WAIT_SECONDS_MAX
from tests.support import server
from tests.support.app import bearer, token
from tests.support.database import MigratedDb, free_port
from tests.support.executors import create_task, start_executor, stop_executor
from tests.support.tenants import tenant

WAIT = 15  # far longer than a wake-up takes: a claim answered well before it was woken


@pytest.fixture(scope="module")
def servers(db: MigratedDb) -> Iterator[tuple[str, str]]:
    with server.running_server(db) as one, server.running_server(db) as two:
        yield one, two


@pytest.fixture(scope="module")
def tid(db: MigratedDb) -> int:
    return tenant(db, "claim-wait", concurrent=0, bytes_month=0, storage_gb=0)


def claim(api: str, scope: int = 0, **body: Any) -> tuple[float, httpx.Response]:
    """A claim by an executor of every tenant (scope 0) or of one."""
    started = time.monotonic()
    response = httpx.post(
        f"{api}/api/v1/executor/claim",
        headers=bearer(token(scope, "executor")),
        json={"max_files": 10, "lease_seconds": 60, **body},
        timeout=60,
    )
    return time.monotonic() - started, response


def claim_while(api: str, action: Any, scope: int = 0, wait: int = WAIT) -> tuple[float, httpx.Response]:
    """A waiting claim on `api`, and `action` done once it waits."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(claim, api, scope, wait_seconds=wait)
        time.sleep(1.0)  # it is waiting by now (the queue is empty)
        assert not waiting.done()
        action()
        return waiting.result(timeout=60)


@pytest.mark.parametrize("through", ["the other instance", "the same instance"])
def test_a_waiting_claim_gets_a_new_task_at_once(servers: tuple[str, str], tid: int, through: str) -> None:
    waiting_on, created_on = servers if through == "the other instance" else (servers[0], servers[0])
    repo = f"org/wait-{through.split()[1]}"

    def create() -> None:
        assert create_task(created_on, tid, repo, "main", [{"path": "a.bin", "size": 10}]).status_code == 201

    took, response = claim_while(waiting_on, create)
    assert response.status_code == 200, response.text
    assert [f["repo_id"] for f in response.json()["files"]] == [repo]
    assert took < WAIT / 2, took  # woken: it did not wait its whole wait


def test_a_wait_with_nothing_to_claim_ends_empty(servers: tuple[str, str], db: MigratedDb) -> None:
    took, response = claim(servers[0], wait_seconds=2)
    assert response.status_code == 200 and response.json()["files"] == []
    assert took >= 2

    def notify() -> None:  # anyone may NOTIFY the channel: the claim looks again, finds nothing
        with psycopg.connect(db.app_url, autocommit=True) as conn:
            conn.execute("NOTIFY dlw_executor_queue, 'spoofed'")

    # The NOTIFY comes 1 s into a 5 s wait: a claim it ended would be back at about 1 s.
    took, response = claim_while(servers[1], notify, wait=5)
    assert response.status_code == 200 and response.json()["files"] == []
    assert took >= 5


def test_a_claim_limited_to_one_tenant_is_woken_by_its_tenants_work(servers: tuple[str, str], tid: int) -> None:
    def create() -> None:
        assert create_task(servers[1], tid, "org/mine", "main", [{"path": "b.bin", "size": 10}]).status_code == 201

    took, response = claim_while(servers[0], create, scope=tid)
    assert [f["repo_id"] for f in response.json()["files"]] == ["org/mine"]
    assert took < WAIT / 2, took


def test_an_idle_executor_whose_api_is_unreachable_asks_again_after_its_poll_interval(work: Path) -> None:
    """Its claim waits on the server only when the server answers: a refused connection is asked
    again after --poll-seconds (1 s here), not at once in a loop."""
    nobody = f"http://127.0.0.1:{free_port()}"
    executor = start_executor(
        nobody, SimpleNamespace(url=nobody), work / "storage", "unreachable", "--poll-seconds", "1"
    )
    time.sleep(3)
    code, log = stop_executor(executor)
    assert code == 0, log
    attempts = log.count("claim failed") - log.count("deletion claim failed")
    assert 1 <= attempts <= 5, log


@pytest.mark.parametrize("wait", [-1, CLAIM_WAIT_SECONDS_MAX + 1, "5", 2.5])
def test_a_wait_out_of_bounds_is_refused(servers: tuple[str, str], wait: Any) -> None:
    took, response = claim(servers[0], wait_seconds=wait)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["code"] == "VALIDATION_FAILED"
    assert took < 5
