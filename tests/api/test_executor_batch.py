"""POST /api/v1/executor/reports: many completions and heartbeats in one transaction, each
answered as its single-file route would, within the executor's scope (issue 17, item 4)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.domain import CLAIM_MAX_FILES
from tests.api.test_executor_api import claim, create
from tests.support.app import app_settings, bearer, detail, token
from tests.support.database import MigratedDb
from tests.support.tenants import UNLIMITED, tenant

SHA = hashlib.sha256(b"x").hexdigest()


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def reports(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post("/api/v1/executor/reports", headers=headers, json=body)


def test_many_completions_and_heartbeats_in_one_request(client, db):
    tid = tenant(db, "batch-flow", **UNLIMITED)
    task = create(client, tid, [{"path": f"f{i}.bin", "size": 1, "sha256": SHA} for i in range(30)], repo="org/batch")
    executor = bearer(token(tid, "executor", user_id="exec-batch"))
    files = claim(client, executor, max_files=30, lease_seconds=30)
    assert len(files) == 30
    done, beating = files[:25], files[25:]
    wrong = done.pop()  # one bad report in the batch: refused alone
    answer = reports(
        client,
        executor,
        completions=[
            {"file_id": f["id"], "assignment_token": f["assignment_token"], "bytes": 1, "sha256": SHA} for f in done
        ]
        + [{"file_id": wrong["id"], "assignment_token": str(uuid.uuid4()), "bytes": 1, "sha256": SHA}],
        heartbeats=[{"file_id": f["id"], "assignment_token": f["assignment_token"], "bytes_done": 0} for f in beating],
    )
    assert answer.status_code == 200, answer.text
    results = {(r["action"], r["file_id"]): r for r in answer.json()["results"]}
    assert len(results) == 30
    assert {results[("complete", f["id"])]["outcome"] for f in done} == {"completed"}
    assert results[("complete", wrong["id"])]["outcome"] == "LEASE_LOST"
    assert all(results[("heartbeat", f["id"])]["lease_expires_at"] for f in beating)
    viewer = bearer(token(tid, "tenant_viewer"))
    detail_ = client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()
    statuses = sorted(f["status"] for f in detail_["files"])
    assert statuses.count("succeeded") == 24 and statuses.count("running") == 5
    # Counted once per file, as the single route does.
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.usage_records WHERE tenant_id = %s", (tid,)).fetchone()[0] == 24


def test_a_tenant_executor_cannot_report_another_tenants_files(client, db):
    mine = tenant(db, "batch-mine", **UNLIMITED)
    other = tenant(db, "batch-other", **UNLIMITED)
    create(client, other, [{"path": "secret.bin", "size": 1, "sha256": SHA}], repo="org/other")
    system = bearer(token(0, "executor", user_id="exec-all"))
    (theirs,) = [f for f in claim(client, system, max_files=10, lease_seconds=30) if f["tenant_id"] == other]
    scoped = bearer(token(mine, "executor", user_id="exec-mine"))
    entry = {"file_id": theirs["id"], "assignment_token": theirs["assignment_token"]}
    answer = reports(client, scoped, completions=[{**entry, "bytes": 1, "sha256": SHA}], heartbeats=[entry])
    assert answer.status_code == 200, answer.text
    assert [r["outcome"] for r in answer.json()["results"]] == ["FILE_NOT_FOUND", "FILE_NOT_FOUND"]
    # Nothing changed for the owner's file (still leased to the system executor, not completed).
    with db.owner() as conn:
        assert (
            conn.execute("SELECT status FROM dlw.task_files WHERE id = %s", (theirs["id"],)).fetchone()[0] == "assigned"
        )


def test_batches_are_bounded_and_need_an_executor(client, db):
    tid = tenant(db, "batch-bounds", **UNLIMITED)
    entry = {"file_id": str(uuid.uuid4()), "assignment_token": str(uuid.uuid4()), "bytes_done": 0}
    executor = bearer(token(tid, "executor"))
    too_many = reports(client, executor, heartbeats=[entry] * (CLAIM_MAX_FILES + 1))
    assert too_many.status_code == 422 and detail(too_many)["code"] == "VALIDATION_FAILED"
    assert reports(client, bearer(token(tid, "tenant_admin")), heartbeats=[entry]).status_code == 403
    assert (
        reports(client, executor, heartbeats=[{**entry, "checkpoint_bytes": 5}]).json()["results"][0]["outcome"]
        == "FILE_NOT_FOUND"
    )
