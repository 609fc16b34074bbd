"""The executor API through the real app: tokens system-wide or limited to one tenant, the
claim's answer, each refusal code, and usage counted once however often a completion is sent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, detail, token
from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, tenant

SHA = "ab" * 32


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, executor_max_attempts=2))) as c:
        yield c


def create(client: TestClient, tid: int, files: list[dict[str, Any]], repo: str = "org/model") -> dict[str, Any]:
    response = client.post(
        "/api/v1/tasks",
        headers=bearer(token(tid, "tenant_operator")),
        json={"repo_id": repo, "revision": "v1.0", "files": files},
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def claim(client: TestClient, headers: dict[str, str], **body: Any) -> list[dict[str, Any]]:
    response = client.post("/api/v1/executor/claim", headers=headers, json=body)
    assert response.status_code == 200, response.text
    return list(response.json()["files"])


def post(client: TestClient, headers: dict[str, str], file: dict[str, Any], action: str, **body: Any) -> Any:
    return client.post(
        f"/api/v1/executor/files/{file['id']}/{action}",
        headers=headers,
        json={"assignment_token": file["assignment_token"], **body},
    )


@pytest.fixture(autouse=True)
def empty_queue(db: MigratedDb) -> None:
    with db.owner() as conn:
        conn.execute(
            "UPDATE dlw.task_files SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL"
            " WHERE status IN ('pending', 'assigned', 'running')"
        )
        conn.execute("UPDATE dlw.tasks SET status = 'cancelled' WHERE status IN ('pending', 'running')")


def test_claim_download_and_complete_through_the_api(client, db):
    tid = tenant(db, "api-flow", **UNLIMITED)
    task = create(client, tid, [{"path": "config.json", "size": 5, "sha256": SHA}, {"path": "w/m.bin", "size": 9}])
    executor = bearer(token(0, "executor", user_id="exec-api"))
    files = claim(client, executor, max_files=5, lease_seconds=30, executor="host-1")
    assert sorted(f["path"] for f in files) == ["config.json", "w/m.bin"]
    first = next(f for f in files if f["path"] == "config.json")
    assert first["tenant"] == "api-flow" and first["tenant_id"] == tid and first["task_id"] == task["id"]
    assert (first["repo_id"], first["revision"], first["size"], first["sha256"]) == ("org/model", "v1.0", 5, SHA)
    assert first["attempt"] == 1 and first["lease_seconds"] == 30 and uuid.UUID(first["assignment_token"])

    viewer = bearer(token(tid, "tenant_viewer"))
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()["status"] == "running"
    beat = post(client, executor, first, "heartbeat", bytes_done=3)
    assert beat.status_code == 200 and "lease_expires_at" in beat.json()

    done = post(client, executor, first, "complete", bytes=5, sha256=SHA.upper())
    assert done.status_code == 200 and done.json() == {"outcome": "completed", "task_status": "running"}
    # The same report again (its answer was lost, say): the same success, counted once.
    again = post(client, executor, first, "complete", bytes=5, sha256=SHA)
    assert again.status_code == 200 and again.json() == {"outcome": "already_completed", "task_status": "running"}
    quota = client.get("/api/v1/quota/current", headers=viewer).json()
    assert quota["bytes_used_month"] == 5

    second = next(f for f in files if f["path"] == "w/m.bin")
    last = post(client, executor, second, "complete", bytes=9, sha256="cd" * 32)
    assert last.json() == {"outcome": "completed", "task_status": "succeeded"}
    got = client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()
    assert got["status"] == "succeeded"
    assert {f["path"]: (f["status"], f["bytes_done"], f["attempts"]) for f in got["files"]} == {
        "config.json": ("succeeded", 5, 1),
        "w/m.bin": ("succeeded", 9, 1),
    }
    assert client.get("/api/v1/quota/current", headers=viewer).json()["bytes_used_month"] == 14
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.usage_records WHERE tenant_id = %s", (tid,)).fetchone()[0] == 2
        assert conn.execute(
            "SELECT DISTINCT executor_id FROM dlw.task_files WHERE task_id = %s", (task["id"],)
        ).fetchall() == [("exec-api/host-1",)]


def test_refusals_have_stable_codes(client, db):
    tid = tenant(db, "api-codes", **UNLIMITED)
    create(client, tid, [{"path": "a", "size": 1, "sha256": SHA}, {"path": "b", "size": 1}])
    executor = bearer(token(tid, "executor"))
    files = {f["path"]: f for f in claim(client, executor, max_files=2)}
    stale = {**files["b"], "assignment_token": str(uuid.uuid4())}
    for action, body in (
        ("heartbeat", {}),
        ("complete", {"bytes": 1, "sha256": SHA}),
        ("fail", {"error": "x"}),
        ("release", {}),
    ):
        lost = post(client, executor, stale, action, **body)
        assert lost.status_code == 409 and lost.json()["detail"]["code"] == "LEASE_LOST", action
        missing = post(client, executor, {**stale, "id": str(uuid.uuid4())}, action, **body)
        assert missing.status_code == 404 and missing.json()["detail"]["code"] == "FILE_NOT_FOUND", action
    # Malformed requests never reach the database.
    assert post(client, executor, files["a"], "complete", bytes=1, sha256="xyz").status_code == 422
    assert post(client, executor, files["a"], "complete", bytes=-1, sha256=SHA).status_code == 422
    assert client.post("/api/v1/executor/claim", headers=executor, json={"max_files": 0}).status_code == 422
    assert client.post("/api/v1/executor/claim", headers=executor, json={"lease_seconds": 1}).status_code == 422
    assert client.post("/api/v1/executor/claim", headers=executor, json={"executor": "a b"}).status_code == 422
    bad = client.post(f"/api/v1/executor/files/{files['a']['id']}/complete", headers=executor, json={"bytes": 1})
    assert bad.status_code == 422

    # Content other than the manifest's: the file and task fail, nothing is counted.
    mismatch = post(client, executor, files["a"], "complete", bytes=1, sha256="00" * 32)
    assert mismatch.status_code == 422
    assert detail(mismatch) == {"code": "SHA256_MISMATCH", "task_status": "failed"}
    assert post(client, executor, files["b"], "heartbeat").status_code == 409  # its task failed: lease lost
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.usage_records WHERE tenant_id = %s", (tid,)).fetchone()[0] == 0


def test_a_count_beyond_or_besides_the_declared_size_is_size_mismatch(client, db):
    """An executor reported 4.6e18 bytes for a 10-byte file: the tenant's month was used up.
    Only the declared size may be reported, and only it is counted."""
    tid = tenant(db, "api-size", concurrent=0, bytes_month=1000, storage_gb=0)
    task = create(client, tid, [{"path": "a", "size": 10}, {"path": "b", "size": 10}])
    executor = bearer(token(tid, "executor"))
    files = {f["path"]: f for f in claim(client, executor, max_files=2)}
    # Progress beyond the declared size is refused and changes nothing; up to it is fine.
    beyond = post(client, executor, files["a"], "heartbeat", bytes_done=11)
    assert beyond.status_code == 422 and beyond.json()["detail"]["code"] == "SIZE_MISMATCH"
    assert post(client, executor, files["a"], "heartbeat", bytes_done=10).status_code == 200
    huge = post(client, executor, files["a"], "complete", bytes=(1 << 62), sha256=SHA)
    assert huge.status_code == 422
    assert detail(huge) == {"code": "SIZE_MISMATCH", "task_status": "failed"}
    viewer = bearer(token(tid, "tenant_viewer"))
    got = client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()
    assert got["status"] == "failed" and got["error"] == f"a: size mismatch: declared 10 bytes, reported {1 << 62}"
    assert client.get("/api/v1/quota/current", headers=viewer).json()["bytes_used_month"] == 0
    # The month is untouched: a task of the whole quota is admitted, and counts its declared size.
    create(client, tid, [{"path": "c", "size": 1000}])
    (file,) = claim(client, executor)
    zero = post(client, executor, file, "complete", bytes=0, sha256=SHA)
    assert detail(zero) == {"code": "SIZE_MISMATCH", "task_status": "failed"}
    create(client, tid, [{"path": "d", "size": 1000}])
    (file,) = claim(client, executor)
    assert post(client, executor, file, "complete", bytes=1000, sha256=SHA).json()["outcome"] == "completed"
    assert client.get("/api/v1/quota/current", headers=viewer).json()["bytes_used_month"] == 1000


def test_failures_retry_up_to_the_configured_limit_and_release_uses_no_attempt(client, db):
    tid = tenant(db, "api-retry", **UNLIMITED)
    task = create(client, tid, [{"path": "a", "size": 1}])
    executor = bearer(token(tid, "executor"))
    (file,) = claim(client, executor)
    assert post(client, executor, file, "release").json() == {"outcome": "released", "task_status": None}
    (file,) = claim(client, executor)
    assert file["attempt"] == 1
    retry = post(client, executor, file, "fail", error="upstream 503", retryable=True)
    assert retry.json() == {"outcome": "requeued", "task_status": "running"}
    assert claim(client, executor) == []  # backing off (tests/sql/test_executor_backoff.py)
    with db.owner() as conn:
        conn.execute("UPDATE dlw.task_files SET not_before = created_at WHERE id = %s", (file["id"],))
    (file,) = claim(client, executor)
    assert file["attempt"] == 2
    # DLW_EXECUTOR_MAX_ATTEMPTS is 2 for this app: the second retryable failure is final.
    final = post(client, executor, file, "fail", error="upstream 503", retryable=True)
    assert final.json() == {"outcome": "failed", "task_status": "failed"}
    got = client.get(f"/api/v1/tasks/{task['id']}", headers=bearer(token(tid, "tenant_viewer"))).json()
    assert got["status"] == "failed" and got["error"] == "a: upstream 503 (attempt 2 of 2)"


def test_tokens_limited_to_a_tenant_and_system_wide(client, db):
    a, b = tenant(db, "api-scope-a", **UNLIMITED), tenant(db, "api-scope-b", **UNLIMITED)
    create(client, a, [{"path": "x", "size": 1}])
    create(client, b, [{"path": "y", "size": 1}])
    only_b = claim(client, bearer(token(b, "executor")), max_files=10)
    assert [(f["tenant"], f["path"]) for f in only_b] == [("api-scope-b", "y")]
    # The system-wide token (tid 0, as `dlw token issue --role executor` mints) sees every tenant.
    everyone = bearer(token(0, "executor"))
    assert [(f["tenant"], f["path"]) for f in claim(client, everyone, max_files=10)] == [("api-scope-a", "x")]
    # A tenant-limited token cannot report on another tenant's file, even with its real token.
    theirs = post(client, bearer(token(a, "executor")), only_b[0], "complete", bytes=1, sha256=SHA)
    assert theirs.status_code == 404
    assert post(client, everyone, only_b[0], "complete", bytes=1, sha256=SHA).status_code == 200


def test_other_roles_are_refused_before_the_body_is_read(client, db):
    tid = tenant(db, "api-roles", **UNLIMITED)
    for role in ("tenant_admin", "tenant_operator", "tenant_viewer", "system_admin"):
        response = client.post("/api/v1/executor/claim", headers=bearer(token(tid, role)), content=b"not json")
        assert response.status_code == 403 and response.json()["detail"]["code"] == "RBAC_DENIED"
    assert client.post("/api/v1/executor/claim", json={}).status_code == 401
