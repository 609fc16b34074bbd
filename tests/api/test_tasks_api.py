"""The task API end to end: validation, admission answers, idempotency, listing, cancel,
quota and storage targets; concurrency through a real server process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app import domain
from app.api.factory import create_app
from tests.support import server
from tests.support.app import app_settings, bearer, detail, every_page, token
from tests.support.database import MigratedDb
from tests.support.deployment import admission_burst, fire
from tests.support.tenants import tenant


def body(**overrides: Any) -> dict[str, Any]:
    return {"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 10}], **overrides}


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def test_create_get_list_cancel(client: TestClient, db: MigratedDb):
    tid = tenant(db, "crud")
    op = bearer(token(tid, "tenant_operator", user_id="op-1"))
    sha = "A" * 64
    created = client.post(
        "/api/v1/tasks",
        headers=op,
        json=body(
            files=[{"path": "config.json", "size": 5, "sha256": sha}, {"path": "w/model.bin", "size": 7}], priority=3
        ),
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["status"] == "pending" and task["file_count"] == 2 and task["total_bytes"] == 12
    assert task["priority"] == 3 and task["created_by"] == "op-1"
    viewer = bearer(token(tid, "tenant_viewer"))
    got = client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()
    assert [(f["path"], f["sha256"], f["status"]) for f in got["files"]] == [
        ("config.json", "a" * 64, "pending"),
        ("w/model.bin", None, "pending"),
    ]
    assert [t["id"] for t in client.get("/api/v1/tasks", headers=viewer).json()["items"]] == [task["id"]]
    assert client.post(f"/api/v1/tasks/{task['id']}/cancel", headers=op).status_code == 202
    again = client.post(f"/api/v1/tasks/{task['id']}/cancel", headers=op)
    assert again.status_code == 409 and again.json()["detail"]["code"] == "TASK_TERMINAL"
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).json()["status"] == "cancelled"
    missing = client.get(f"/api/v1/tasks/{uuid.uuid4()}", headers=viewer)
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "TASK_NOT_FOUND"


def test_listing_pages_newest_first_and_filters_by_status(client: TestClient, db: MigratedDb):
    tid = tenant(db, "lister", concurrent=0)
    op = bearer(token(tid, "tenant_operator"))
    ids = [client.post("/api/v1/tasks", headers=op, json=body(revision=f"r{i}")).json()["id"] for i in range(7)]
    client.post(f"/api/v1/tasks/{ids[0]}/cancel", headers=op)
    seen = [t["id"] for t in every_page(client, "/api/v1/tasks", op, {"limit": 3})]
    assert seen == list(reversed(ids))
    cancelled = client.get("/api/v1/tasks", headers=op, params={"status": "cancelled"}).json()["items"]
    assert [t["id"] for t in cancelled] == [ids[0]]
    assert client.get("/api/v1/tasks", headers=op, params={"status": "done"}).status_code == 422
    assert client.get("/api/v1/tasks", headers=op, params={"limit": 201}).status_code == 422


def test_another_tenants_task_is_404_everywhere(client: TestClient, db: MigratedDb):
    a, b = tenant(db, "iso-a"), tenant(db, "iso-b")
    task_b = client.post("/api/v1/tasks", headers=bearer(token(b, "tenant_operator")), json=body()).json()["id"]
    op_a = bearer(token(a, "tenant_admin"))
    assert client.get(f"/api/v1/tasks/{task_b}", headers=op_a).status_code == 404
    assert client.post(f"/api/v1/tasks/{task_b}/cancel", headers=op_a).status_code == 404
    assert client.get("/api/v1/tasks", headers=op_a).json()["items"] == []


def test_two_files_with_one_path_are_422_duplicate_file_path(client: TestClient, db: MigratedDb):
    """No schema keyword says "unique by path": a code of its own, listed in the OpenAPI document."""
    op = bearer(token(tenant(db, "dup-paths"), "tenant_operator"))
    files = [{"path": "a", "size": 1}, {"path": "a", "size": 2}]
    response = client.post("/api/v1/tasks", headers=op, json=body(files=files))
    assert response.status_code == 422 and response.json()["detail"]["code"] == "DUPLICATE_FILE_PATH", response.text


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"repo_id": "no-slash"}, ["body", "repo_id"]),
        ({"repo_id": "a/b/c"}, ["body", "repo_id"]),
        ({"revision": ""}, ["body", "revision"]),
        ({"revision": "main/../x"}, ["body", "revision"]),
        ({"files": []}, ["body", "files"]),
        ({"files": [{"path": "/etc/passwd", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a/../../b", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "ok", "size": -1}]}, ["body", "files", 0, "size"]),
        ({"files": [{"path": "ok", "size": 1, "sha256": "xyz"}]}, ["body", "files", 0, "sha256"]),
        ({"files": [{"path": "ok", "size": "big"}]}, ["body", "files", 0, "size"]),
        ({"files": [{"path": "a//b", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a\\b", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a/./b", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"revision": "main/.."}, ["body", "revision"]),
        # Python's "$" would take a final newline; the patterns refuse it (as the OpenAPI reading does).
        ({"repo_id": "org/model\n"}, ["body", "repo_id"]),
        ({"revision": "main\n"}, ["body", "revision"]),
        ({"revision": "0123456789abcdef0123456789abcdef01234567\n"}, ["body", "revision"]),
        ({"files": [{"path": "a.bin\n", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "ok", "size": 1, "sha256": "ab" * 32 + "\n"}]}, ["body", "files", 0, "sha256"]),
        # Control characters (C0, DEL, C1) anywhere in a path: the stored-path rule refuses them.
        ({"files": [{"path": "a\tb", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a\nb", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a\x7fb", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"files": [{"path": "a\x85b", "size": 1}]}, ["body", "files", 0, "path"]),
        ({"priority": 10_000}, ["body", "priority"]),
        ({"project_id": "not-a-uuid"}, ["body", "project_id"]),
        ({"surprise": True}, ["body", "surprise"]),
    ],
)
def test_malformed_fields_are_422_naming_the_field(client: TestClient, db: MigratedDb, overrides, field):
    op = bearer(token(tenant(db, "validator"), "tenant_operator"))
    response = client.post("/api/v1/tasks", headers=op, json=body(**overrides))
    assert response.status_code == 422, response.text
    locs = [err["loc"] for err in response.json()["detail"]["errors"]]
    assert field in locs, locs


def test_oversized_or_junk_bodies_are_refused_never_500(client: TestClient, db: MigratedDb):
    op = bearer(token(tenant(db, "junk"), "tenant_operator"))
    too_many = body(files=[{"path": f"f{i}", "size": 1} for i in range(10_001)])
    response = client.post("/api/v1/tasks", headers=op, json=too_many)
    assert response.status_code == 422 and ["body", "files"] in [e["loc"] for e in response.json()["detail"]["errors"]]
    junk = client.post("/api/v1/tasks", headers={**op, "Content-Type": "application/json"}, content=b"\x00{" * 500_000)
    assert junk.status_code in (413, 422)
    huge = client.post(
        "/api/v1/tasks", headers={**op, "Content-Type": "application/json"}, content=b"[" * (17 * 1024 * 1024)
    )
    assert huge.status_code == 413 and huge.json()["detail"]["code"] == "BODY_TOO_LARGE"
    assert client.post("/api/v1/tasks", headers=op, json=["not", "an", "object"]).status_code == 422


def test_unknown_or_foreign_project_and_target_are_422_with_a_code(client: TestClient, db: MigratedDb):
    mine, theirs = tenant(db, "owner-a"), tenant(db, "owner-b")
    with db.owner() as conn:
        their_project, their_target = conn.execute(
            "SELECT p.id, s.id FROM dlw.projects p, dlw.storage_targets s WHERE p.tenant_id = %s AND s.tenant_id = %s",
            (theirs, theirs),
        ).fetchone()
    op = bearer(token(mine, "tenant_operator"))
    for overrides, code in (
        ({"storage_target": "nope"}, "UNKNOWN_STORAGE_TARGET"),
        ({"storage_target": str(their_target)}, "UNKNOWN_STORAGE_TARGET"),
        ({"project_id": str(uuid.uuid4())}, "UNKNOWN_PROJECT"),
        ({"project_id": str(their_project)}, "UNKNOWN_PROJECT"),
    ):
        response = client.post("/api/v1/tasks", headers=op, json=body(**overrides))
        assert response.status_code == 422 and detail(response) == {"code": code}, overrides


def test_quota_refusals_are_429_with_the_metric_and_audited(client: TestClient, db: MigratedDb):
    tid = tenant(db, "tight", concurrent=1, bytes_month=100)
    op = bearer(token(tid, "tenant_operator"))
    big = client.post("/api/v1/tasks", headers=op, json=body(files=[{"path": "x", "size": 101}]))
    assert big.status_code == 429 and detail(big) == {"code": "QUOTA_EXCEEDED", "metric": "bytes_month"}
    assert client.post("/api/v1/tasks", headers=op, json=body()).status_code == 201
    second = client.post("/api/v1/tasks", headers=op, json=body())
    assert second.status_code == 429
    assert detail(second) == {"code": "QUOTA_EXCEEDED", "metric": "concurrent_tasks"}
    with db.owner() as conn:
        metrics = [
            r[0]
            for r in conn.execute(
                "SELECT detail->>'metric' FROM dlw.audit_log WHERE tenant_id = %s"
                " AND action = 'quota.exceeded' ORDER BY at",
                (tid,),
            )
        ]
    assert metrics == ["bytes_month", "concurrent_tasks"]
    quota = client.get("/api/v1/quota/current", headers=bearer(token(tid, "tenant_viewer"))).json()
    assert quota["concurrent_tasks"] == 1 and quota["concurrent_quota"] == 1
    assert quota["bytes_used_month"] == 0 and quota["bytes_quota_month"] == 100 and quota["tenant_id"] == tid
    assert set(quota) >= {"storage_gb_used", "storage_gb_quota", "snapshot_age_seconds"}


def test_the_storage_quota_is_429_storage_gb_and_quota_current_shows_its_figures(client: TestClient, db: MigratedDb):
    tid = tenant(db, "storage-http", concurrent=0, bytes_month=0, storage_gb=1)
    op, viewer = bearer(token(tid, "tenant_operator")), bearer(token(tid, "tenant_viewer"))
    gb = domain.STORAGE_GB_BYTES
    most = client.post("/api/v1/tasks", headers=op, json=body(files=[{"path": "w", "size": gb * 9 // 10}]))
    assert most.status_code == 201, most.text
    over = client.post("/api/v1/tasks", headers=op, json=body(files=[{"path": "x", "size": gb // 10 + 1}]))
    assert over.status_code == 429 and detail(over) == {"code": "QUOTA_EXCEEDED", "metric": "storage_gb"}
    quota = client.get("/api/v1/quota/current", headers=viewer).json()
    assert (quota["storage_bytes_used"], quota["storage_bytes_reserved"]) == (0, gb * 9 // 10)
    assert (quota["storage_gb_used"], quota["storage_gb_quota"]) == (0, 1)
    assert client.post(f"/api/v1/tasks/{most.json()['id']}/cancel", headers=op).status_code == 202
    assert client.get("/api/v1/quota/current", headers=viewer).json()["storage_bytes_reserved"] == 0
    assert client.post("/api/v1/tasks", headers=op, json=body(files=[{"path": "x", "size": gb}])).status_code == 201


def test_quota_current_shows_what_live_tasks_reserve(client: TestClient, db: MigratedDb):
    tid = tenant(db, "reserved", concurrent=0, bytes_month=100)
    op, viewer = bearer(token(tid, "tenant_operator")), bearer(token(tid, "tenant_viewer"))
    eighty = body(files=[{"path": "x", "size": 80}])
    first = client.post("/api/v1/tasks", headers=op, json=eighty)
    assert first.status_code == 201
    second = client.post("/api/v1/tasks", headers=op, json=eighty)  # 80 reserved + 80 > 100
    assert second.status_code == 429 and detail(second) == {"code": "QUOTA_EXCEEDED", "metric": "bytes_month"}
    quota = client.get("/api/v1/quota/current", headers=viewer).json()
    assert (quota["bytes_used_month"], quota["bytes_reserved"], quota["bytes_quota_month"]) == (0, 80, 100)
    assert (quota["tasks_last_minute"], quota["storage_targets"]) == (1, 1)
    assert client.post(f"/api/v1/tasks/{first.json()['id']}/cancel", headers=op).status_code == 202
    assert client.get("/api/v1/quota/current", headers=viewer).json()["bytes_reserved"] == 0
    assert client.post("/api/v1/tasks", headers=op, json=eighty).status_code == 201


def test_a_create_then_cancel_flood_is_refused_with_429_tasks_per_minute(client: TestClient, db: MigratedDb):
    tid = tenant(db, "churn", concurrent=1)
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 10 WHERE tenant_id = %s", (tid,))
    op = bearer(token(tid, "tenant_operator", user_id="churner"))
    codes = []
    for _ in range(30):
        created = client.post("/api/v1/tasks", headers=op, json=body())
        codes.append(created.status_code)
        if created.status_code == 201:
            assert client.post(f"/api/v1/tasks/{created.json()['id']}/cancel", headers=op).status_code == 202
        else:
            assert detail(created) == {"code": "QUOTA_EXCEEDED", "metric": "tasks_per_minute"}
    assert codes == [201] * 10 + [429] * 20
    quota = client.get("/api/v1/quota/current", headers=op).json()
    assert (quota["tasks_last_minute"], quota["tasks_per_minute_quota"]) == (10, 10)
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)).fetchone() == (10,)
        rows, total = conn.execute(
            "SELECT count(*), sum(count) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'quota.exceeded'",
            (tid,),
        ).fetchone()
    assert rows <= 2 and total == 20


def test_an_inactive_tenant_cannot_create(client: TestClient, db: MigratedDb):
    tid = tenant(db, "dormant")
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET active = false WHERE tenant_id = %s", (tid,))
    response = client.post("/api/v1/tasks", headers=bearer(token(tid, "tenant_admin")), json=body())
    assert response.status_code == 403 and response.json()["detail"]["code"] == "TENANT_INACTIVE"


def test_idempotency_key_returns_the_first_task_or_conflicts(client: TestClient, db: MigratedDb):
    op = {**bearer(token(tenant(db, "idem"), "tenant_operator")), "Idempotency-Key": "req-1"}
    first = client.post("/api/v1/tasks", headers=op, json=body())
    retry = client.post("/api/v1/tasks", headers=op, json=body())
    assert first.status_code == 201 and retry.status_code == 200 and retry.json()["id"] == first.json()["id"]
    other = client.post("/api/v1/tasks", headers=op, json=body(revision="v2"))
    assert other.status_code == 409 and other.json()["detail"]["code"] == "IDEMPOTENCY_CONFLICT"


def test_storage_targets(client: TestClient, db: MigratedDb):
    tid = tenant(db, "stores")
    admin, viewer = bearer(token(tid, "tenant_admin")), bearer(token(tid, "tenant_viewer"))
    secret = client.post("/api/v1/storage-targets", headers=admin, json={"name": "fast", "config": {"key": "s3cr3t"}})
    assert secret.status_code == 422 and secret.json()["detail"]["code"] == "STORAGE_TARGET_CONFIG_SECRET"
    assert "s3cr3t" not in secret.text
    config = {"root": "/srv/dlw/stores-fast", "layout": "tree"}
    created = client.post("/api/v1/storage-targets", headers=admin, json={"name": "fast", "config": config})
    assert created.status_code == 201 and "config" not in created.json() and "stores-fast" not in created.text
    assert [t["name"] for t in client.get("/api/v1/storage-targets", headers=viewer).json()] == ["default", "fast"]
    assert client.post("/api/v1/storage-targets", headers=admin, json={"name": "fast"}).status_code == 409
    assert client.post("/api/v1/storage-targets", headers=admin, json={"name": "../x"}).status_code == 422
    assert client.post("/api/v1/tasks", headers=admin, json=body(storage_target="fast")).status_code == 201


def test_storage_targets_are_capped_in_number_and_config_size(client: TestClient, db: MigratedDb):
    tid = tenant(db, "hoarder")
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET quota_storage_targets = 3 WHERE tenant_id = %s", (tid,))
    admin = bearer(token(tid, "tenant_admin"))
    huge = {"blob": "x" * domain.STORAGE_TARGET_CONFIG_MAX_BYTES}
    too_big = client.post("/api/v1/storage-targets", headers=admin, json={"name": "huge", "config": huge})
    assert too_big.status_code == 422 and too_big.json()["detail"]["code"] == "STORAGE_TARGET_CONFIG_TOO_LARGE"
    codes = [
        client.post("/api/v1/storage-targets", headers=admin, json={"name": f"t{i}"}).status_code for i in range(5)
    ]
    assert codes == [201, 201, 409, 409, 409]
    refused = client.post("/api/v1/storage-targets", headers=admin, json={"name": "t9"})
    assert refused.json()["detail"]["code"] == "STORAGE_TARGET_LIMIT"
    names = [t["name"] for t in client.get("/api/v1/storage-targets", headers=admin).json()]
    assert names == ["default", "t0", "t1"]
    assert client.get("/api/v1/quota/current", headers=admin).json()["storage_targets_quota"] == 3


async def _fire(base: str, headers: dict[str, str], bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    return await fire([base], headers, bodies)


def test_200_simultaneous_creates_through_the_api_admit_exactly_the_limit(db: MigratedDb):
    with server.running_server(db, DLW_QUOTA_LOCK_TIMEOUT_MS="30000") as base:
        print("200-way admission, one server:", admission_burst(db, [base], "one"))


def test_50_concurrent_retries_with_one_key_create_one_task_through_the_api(db: MigratedDb):
    tid = tenant(db, "retry-storm")
    headers = {**bearer(token(tid, "tenant_operator")), "Idempotency-Key": "storm"}
    with server.running_server(db, DLW_QUOTA_LOCK_TIMEOUT_MS="30000") as base:
        responses = asyncio.run(_fire(base, headers, [body()] * 50))
    assert sorted(r.status_code for r in responses) == [200] * 49 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
