"""DELETE /api/v1/tasks/{id} and the executor deletion routes through the real app
(sql/44_executor_deletions.sql): a live task is 409 TASK_LIVE; a finished one is 202 with the
task showing `deleting`, again 202 unchanged; an executor claims the deletion with its plan and
completes it, and GET shows `deleted` with the storage released; a task being deleted cannot be
retried (409 TASK_DELETED). Another tenant can neither delete, see nor detect the task or its
deletion (404 exactly as for an unknown id; its executors claim nothing and report 404)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.api.test_task_retry import claim, create, failed_task, report, task_of
from tests.support.app import app_settings, bearer, detail, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

SHA = "ab" * 32


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def delete(client: TestClient, tid: int, task: str, role: str = "tenant_operator") -> Any:
    return client.delete(f"/api/v1/tasks/{task}", headers=bearer(token(tid, role, user_id=f"{role}-1")))


def executor(client: TestClient, tid: int, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, headers=bearer(token(tid, "executor", user_id="deleter")), json=body)


def claim_deletions(client: TestClient, tid: int) -> list[dict[str, Any]]:
    response = executor(client, tid, "/api/v1/executor/deletions/claim", {"max_deletions": 10})
    assert response.status_code == 200, response.text
    return list(response.json()["deletions"])


def succeeded(client: TestClient, tid: int, sizes: dict[str, int]) -> str:
    task = create(client, tid, sizes)
    for path, file in claim(client, tid).items():
        assert report(client, tid, file, "complete", bytes=sizes[path], sha256=SHA)["outcome"] == "completed"
    assert task_of(client, tid, task)["status"] == "succeeded"
    return task


def test_delete_a_finished_task_then_the_executor_deletes_it(client, db):
    tid = tenant(db, "del-api", concurrent=0, bytes_month=0)
    live = create(client, tid, {"x": 3})
    refused = delete(client, tid, live)
    assert refused.status_code == 409 and detail(refused)["code"] == "TASK_LIVE"
    client.post(f"/api/v1/tasks/{live}/cancel", headers=bearer(token(tid, "tenant_operator")))

    task = succeeded(client, tid, {"a": 5})
    first = delete(client, tid, task, "tenant_admin")
    assert first.status_code == 202 and first.json()["deletion"] == "deleting" and first.json()["status"] == "succeeded"
    again = delete(client, tid, task)
    assert again.status_code == 202 and again.json()["deletion"] == "deleting"
    shown = task_of(client, tid, task)
    assert shown["deletion"] == "deleting" and shown["deletion_detail"]["status"] == "pending"

    [work] = [d for d in claim_deletions(client, tid) if d["task_id"] == task]
    assert work["plan"]["layout"] == "tree" and work["plan"]["files"][0]["path"] == "a"
    assert work["plan"]["files"][0]["remove_path"] is True
    wrong = executor(
        client, tid, f"/api/v1/executor/deletions/{work['id']}/complete", {"assignment_token": str(uuid.uuid4())}
    )
    assert wrong.status_code == 409 and detail(wrong)["code"] == "LEASE_LOST"
    beat = executor(
        client,
        tid,
        f"/api/v1/executor/deletions/{work['id']}/heartbeat",
        {"assignment_token": work["assignment_token"]},
    )
    assert beat.status_code == 200, beat.text
    done = executor(
        client, tid, f"/api/v1/executor/deletions/{work['id']}/complete", {"assignment_token": work["assignment_token"]}
    )
    assert done.status_code == 200 and done.json()["outcome"] == "deleted" and done.json()["released_bytes"] == 5
    shown = task_of(client, tid, task)
    assert shown["deletion"] == "deleted" and shown["deleted_at"] is not None
    assert shown["deletion_detail"]["status"] == "done" and shown["deletion_detail"]["released_bytes"] == 5
    assert delete(client, tid, task).json()["deletion"] == "deleted"  # still not an error
    listed = client.get("/api/v1/tasks", headers=bearer(token(tid, "tenant_viewer"))).json()["items"]
    assert {t["id"]: t["deletion"] for t in listed}[task] == "deleted"


def test_a_task_being_deleted_is_not_retried_and_a_viewer_cannot_delete(client, db):
    tid = tenant(db, "del-api-retry", concurrent=0, bytes_month=0)
    task = failed_task(client, tid, {"a": 1, "b": 2})
    viewer = delete(client, tid, task, "tenant_viewer")
    assert viewer.status_code == 403 and detail(viewer)["code"] == "RBAC_DENIED"
    assert delete(client, tid, task).status_code == 202
    retried = client.post(f"/api/v1/tasks/{task}/retry", headers=bearer(token(tid, "tenant_operator")))
    assert retried.status_code == 409 and detail(retried)["code"] == "TASK_DELETED"


def test_another_tenant_cannot_delete_see_or_detect_the_task_or_its_deletion(client, db):
    a = tenant(db, "del-api-a", concurrent=0, bytes_month=0)
    b = tenant(db, "del-api-b", concurrent=0, bytes_month=0)
    task = succeeded(client, a, {"secret": 4})
    theirs, nowhere = delete(client, b, task, "tenant_admin"), delete(client, b, str(uuid.uuid4()), "tenant_admin")
    assert theirs.status_code == nowhere.status_code == 404 and theirs.json() == nowhere.json()
    assert detail(theirs)["code"] == "TASK_NOT_FOUND"
    assert task_of(client, a, task)["deletion"] is None  # B's request changed nothing
    assert delete(client, a, task).status_code == 202
    assert claim_deletions(client, b) == []  # B's executors never see it
    [work] = [d for d in claim_deletions(client, a) if d["task_id"] == task]
    for action, body in (("complete", {}), ("heartbeat", {}), ("fail", {"error": "x"})):
        path = f"/api/v1/executor/deletions/{work['id']}/{action}"
        got = executor(client, b, path, {"assignment_token": work["assignment_token"], **body})
        unknown = executor(
            client,
            b,
            f"/api/v1/executor/deletions/{uuid.uuid4()}/{action}",
            {"assignment_token": work["assignment_token"], **body},
        )
        assert got.status_code == unknown.status_code == 404 and got.json() == unknown.json()
        assert detail(got)["code"] == "DELETION_NOT_FOUND"
    seen = client.get(f"/api/v1/tasks/{task}", headers=bearer(token(b, "tenant_admin")))
    assert seen.status_code == 404
    done = executor(
        client, a, f"/api/v1/executor/deletions/{work['id']}/complete", {"assignment_token": work["assignment_token"]}
    )
    assert done.json()["outcome"] == "deleted"
