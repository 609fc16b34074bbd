"""Storage target configs through the API (docs/storage.md): each bad config is a 4xx with its
stable code in the one error shape, the config (root included) is never echoed, and another
tenant can neither see a root nor take one overlapping it, nor learn whose it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def post(client: TestClient, tid: int, name: str, config: Any) -> Any:
    return client.post(
        "/api/v1/storage-targets", headers=bearer(token(tid, "tenant_admin")), json={"name": name, "config": config}
    )


@pytest.mark.parametrize(
    ("config", "status", "code"),
    [
        ({"root": "srv/x"}, 422, "STORAGE_ROOT_INVALID"),
        ({"root": "/srv/x/../y"}, 422, "STORAGE_ROOT_INVALID"),
        ({"root": "/srv/x", "layout": "zip"}, 422, "STORAGE_LAYOUT_UNKNOWN"),
        ({"root": "/srv/x", "hub_token": "hf_abcdef"}, 422, "STORAGE_TARGET_CONFIG_SECRET"),
        ({"password": "hunter2"}, 422, "STORAGE_TARGET_CONFIG_SECRET"),
        ({"bucket": "bucket-xyz"}, 422, "STORAGE_TARGET_CONFIG_INVALID"),
    ],
)
def test_bad_configs_answer_their_code(client: TestClient, db: MigratedDb, config: Any, status: int, code: str):
    tid = tenant(db, "sta-bad")
    refused = post(client, tid, "bad", config)
    assert refused.status_code == status and refused.json()["detail"]["code"] == code, refused.text
    assert set(refused.json()["detail"]) >= {"code", "message"}
    for value in config.values():  # nothing of the config comes back
        assert str(value) not in refused.text


def test_another_tenant_cannot_see_overlap_or_identify_a_root(client: TestClient, db: MigratedDb):
    a, b = tenant(db, "sta-iso-a"), tenant(db, "sta-iso-b")
    made = post(client, a, "models", {"root": "/srv/sta-iso/a-models", "layout": "hf-cache"})
    assert made.status_code == 201 and "/srv" not in made.text
    listed = client.get("/api/v1/storage-targets", headers=bearer(token(b, "tenant_viewer")))
    assert [t["name"] for t in listed.json()] == ["default"]
    for root in ("/srv/sta-iso/a-models", "/srv/sta-iso/a-models/mine", "/srv/sta-iso", "/srv"):
        taken = post(client, b, "steal", {"root": root})
        assert taken.status_code == 409 and taken.json()["detail"]["code"] == "STORAGE_ROOT_UNAVAILABLE"
        # the refusal is the same whoever holds it and whatever it is: it names neither
        assert "sta-iso-a" not in taken.text and "a-models" not in taken.text.replace(root, "")
    assert post(client, b, "own", {"root": "/srv/sta-iso/b-models"}).status_code == 201
    # a task on the other tenant's target name is simply unknown
    task = client.post(
        "/api/v1/tasks",
        headers=bearer(token(b, "tenant_operator")),
        json={"repo_id": "org/x", "revision": "main", "storage_target": "models", "files": [{"path": "a", "size": 1}]},
    )
    assert task.status_code == 422 and task.json()["detail"]["code"] == "UNKNOWN_STORAGE_TARGET"


def test_an_hf_cache_target_takes_only_tasks_with_a_commit(client: TestClient, db: MigratedDb):
    tid = tenant(db, "sta-commit")
    assert post(client, tid, "cache", {"root": "/srv/sta-commit/hf", "layout": "hf-cache"}).status_code == 201
    op = bearer(token(tid, "tenant_operator"))
    files = [{"path": "config.json", "size": 3}]
    # No hub in this test app: the client's list is taken as given, with no commit to name a snapshot.
    unresolved = client.post(
        "/api/v1/tasks", headers=op, json={"repo_id": "org/x", "storage_target": "cache", "files": files}
    )
    assert unresolved.status_code == 422 and unresolved.json()["detail"]["code"] == "HF_CACHE_NEEDS_COMMIT"
    pinned = client.post(
        "/api/v1/tasks",
        headers=op,
        json={"repo_id": "org/x", "revision": "a" * 40, "storage_target": "cache", "files": files},
    )
    assert pinned.status_code == 201 and pinned.json()["commit"] == "a" * 40, pinned.text
    tree = client.post("/api/v1/tasks", headers=op, json={"repo_id": "org/x", "files": files})
    assert tree.status_code == 201 and tree.json()["commit"] is None  # the default target takes it
