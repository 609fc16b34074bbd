"""POST /api/v1/tasks/{id}/retry through the real app (dlw.retry_task, sql/33_task_retry.sql): a
failed task's failed and cancelled files are queued again and can then succeed; the retry is
admitted against the quota again (429 with the metric); only failed tasks (409); operators and
admins only (a viewer 403), and another tenant can neither retry nor detect the task (404)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, detail, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

SHA = "ab" * 32


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def create(client: TestClient, tid: int, sizes: dict[str, int]) -> str:
    files = [{"path": path, "size": size} for path, size in sizes.items()]
    response = client.post(
        "/api/v1/tasks",
        headers=bearer(token(tid, "tenant_operator")),
        json={"repo_id": "org/model", "revision": "main", "files": files},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def executor_post(client: TestClient, tid: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, headers=bearer(token(tid, "executor")), json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def claim(client: TestClient, tid: int) -> dict[str, dict[str, Any]]:
    files = executor_post(client, tid, "/api/v1/executor/claim", {"max_files": 100})["files"]
    return {f["path"]: f for f in files}


def report(client: TestClient, tid: int, file: dict[str, Any], action: str, **body: Any) -> dict[str, Any]:
    path = f"/api/v1/executor/files/{file['id']}/{action}"
    return executor_post(client, tid, path, {"assignment_token": file["assignment_token"], **body})


def failed_task(client: TestClient, tid: int, sizes: dict[str, int]) -> str:
    """A task whose first file succeeds and second fails finally (cancelling the rest)."""
    task = create(client, tid, sizes)
    claimed = claim(client, tid)
    first, second, *_ = sizes
    assert report(client, tid, claimed[first], "complete", bytes=sizes[first], sha256=SHA)["outcome"] == "completed"
    assert report(client, tid, claimed[second], "fail", error="HTTP 404")["task_status"] == "failed"
    return task


def task_of(client: TestClient, tid: int, task: str) -> dict[str, Any]:
    return dict(client.get(f"/api/v1/tasks/{task}", headers=bearer(token(tid, "tenant_viewer"))).json())


def retry(client: TestClient, tid: int, task: str, role: str = "tenant_operator") -> Any:
    return client.post(f"/api/v1/tasks/{task}/retry", headers=bearer(token(tid, role, user_id=f"{role}-1")))


def test_a_retried_task_downloads_its_failed_and_cancelled_files_and_succeeds(client, db):
    tid = tenant(db, "retry-ok", concurrent=0, bytes_month=0)
    task = failed_task(client, tid, {"a": 1, "b": 2, "c": 4})
    before = task_of(client, tid, task)
    assert [f["status"] for f in before["files"]] == ["succeeded", "failed", "cancelled"]
    answer = retry(client, tid, task, "tenant_admin")
    assert (answer.status_code, answer.json()) == (202, {"files_requeued": 2, "bytes_requeued": 6})
    after = task_of(client, tid, task)
    assert (after["status"], after["error"], after["finished_at"]) == ("pending", None, None)
    assert [f["status"] for f in after["files"]] == ["succeeded", "pending", "pending"]  # a, b, c
    claimed = claim(client, tid)
    assert sorted(claimed) == ["b", "c"] and {f["attempt"] for f in claimed.values()} == {1}  # fresh attempts
    for path, size in (("b", 2), ("c", 4)):
        report(client, tid, claimed[path], "complete", bytes=size, sha256=SHA)
    assert task_of(client, tid, task)["status"] == "succeeded"
    viewer = bearer(token(tid, "tenant_viewer"))
    assert client.get("/api/v1/quota/current", headers=viewer).json()["bytes_used_month"] == 7  # each file once
    with db.owner() as conn:
        audit = conn.execute(
            "SELECT actor, detail FROM dlw.audit_log WHERE action = 'task.retried' AND target = %s", (task,)
        ).fetchall()
    assert audit == [("tenant_admin-1", {"files_requeued": 2, "bytes_requeued": 6})]


def test_a_retry_is_admitted_against_the_quota_again(client, db):
    tid = tenant(db, "retry-quota", concurrent=1, bytes_month=100)
    task = failed_task(client, tid, {"a": 10, "b": 60})
    other = create(client, tid, {"x": 20})  # live: the one concurrent task allowed
    refused = retry(client, tid, task)
    assert refused.status_code == 429 and detail(refused) == {"code": "QUOTA_EXCEEDED", "metric": "concurrent_tasks"}
    op = bearer(token(tid, "tenant_operator"))
    assert client.post(f"/api/v1/tasks/{other}/cancel", headers=op).status_code == 202
    with db.owner() as conn:  # concurrency unlimited now; then 10 used + 31 reserved by y + 60 > 100
        conn.execute("UPDATE dlw.tenants SET quota_concurrent = 0 WHERE tenant_id = %s", (tid,))
    create(client, tid, {"y": 31})
    refused = retry(client, tid, task)
    assert refused.status_code == 429 and detail(refused) == {"code": "QUOTA_EXCEEDED", "metric": "bytes_month"}
    assert task_of(client, tid, task)["status"] == "failed"  # a refusal changes nothing
    with db.owner() as conn:
        conn.execute("UPDATE dlw.task_files SET size = 30 WHERE tenant_id = %s AND path = 'y'", (tid,))
        rows = conn.execute(
            "SELECT detail->>'metric', detail->>'retry_of' FROM dlw.audit_log"
            " WHERE tenant_id = %s AND action = 'quota.exceeded' ORDER BY at",
            (tid,),
        ).fetchall()
    assert rows == [("concurrent_tasks", task), ("bytes_month", task)]
    assert retry(client, tid, task).status_code == 202  # 10 + 30 + 60 = 100: exactly the quota


@pytest.mark.parametrize("status", ["pending", "running", "succeeded", "cancelled"])
def test_only_a_failed_task_can_be_retried(client, db, status):
    tid = tenant(db, f"retry-{status}", concurrent=0, bytes_month=0)
    task = create(client, tid, {"a": 1})
    if status != "pending":
        (file,) = claim(client, tid).values()
    if status == "succeeded":
        report(client, tid, file, "complete", bytes=1, sha256=SHA)
    if status == "cancelled":
        client.post(f"/api/v1/tasks/{task}/cancel", headers=bearer(token(tid, "tenant_operator")))
    assert task_of(client, tid, task)["status"] == status
    conflict = retry(client, tid, task)
    assert conflict.status_code == 409 and detail(conflict) == {"code": "TASK_NOT_FAILED"}


def test_a_retried_task_cannot_be_retried_again_until_it_fails(client, db):
    tid = tenant(db, "retry-twice", concurrent=0, bytes_month=0)
    task = failed_task(client, tid, {"a": 1, "b": 1})
    assert retry(client, tid, task).status_code == 202
    again = retry(client, tid, task)
    assert again.status_code == 409 and detail(again) == {"code": "TASK_NOT_FAILED"}


def test_viewers_may_not_retry_and_other_tenants_cannot_retry_or_detect_the_task(client, db):
    a = tenant(db, "retry-iso-a", concurrent=0, bytes_month=0)
    b = tenant(db, "retry-iso-b", concurrent=0, bytes_month=0)
    task = failed_task(client, a, {"a": 1, "b": 1})
    assert retry(client, a, task, "tenant_viewer").status_code == 403
    foreign, unknown = retry(client, b, task, "tenant_admin"), retry(client, b, str(uuid.uuid4()), "tenant_admin")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json() and detail(foreign) == {"code": "TASK_NOT_FOUND"}
    assert task_of(client, a, task)["status"] == "failed"  # untouched
    with db.owner() as conn:
        audit = conn.execute(
            "SELECT count(*) FROM dlw.audit_log WHERE action = 'task.retried' AND target = %s", (task,)
        ).fetchone()
    assert audit == (0,)
