"""Tasks from a repository name: the API asks the hub (the offline emulator of tests/support/hub)
for the commit and the file list before admission, with include/exclude, checks a client's own
list against it, and answers every hub failure with a stable refusal in bounded time."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.hub import HubEmulator, Repo, running_hub
from tests.support.tenants import tenant

FILES = {
    "config.json": b'{"model_type": "toy"}',
    "README.md": b"# toy model\n",
    "model-00001.safetensors": os.urandom(200_000),
    "model-00002.safetensors": os.urandom(150_000),
    "tokenizer/tokenizer.json": b'{"vocab": {}}',
    "onnx/model.onnx": os.urandom(50_000),
}


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with running_hub() as emulator:
        emulator.hub.repo("org/toy").commit(FILES)
        gated = emulator.hub.repo("org/gated", gated="manual")
        gated.commit({"config.json": b"{}", "weights.safetensors": b"w" * 4096})
        emulator.hub.grant(gated, "hf_granted")
        emulator.hub.user_token("hf_no_access")
        emulator.hub.repo("org/data", repo_type="dataset").commit({"train.parquet": b"p" * 999, "README.md": b"d"})
        yield emulator


@pytest.fixture(scope="module")
def client(db: MigratedDb, hub: HubEmulator) -> Iterator[TestClient]:
    settings = app_settings(db, hf_endpoint=hub.url, hub_timeout_seconds=3, hub_request_timeout_seconds=2)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(autouse=True)
def healthy(hub: HubEmulator) -> Iterator[None]:
    yield
    hub.hub.faults.rate_limited, hub.hub.faults.delay, hub.hub.faults.down = 0, 0.0, False


def create(client: TestClient, tid: int, **body: Any) -> Any:
    return client.post("/api/v1/tasks", headers=bearer(token(tid, "tenant_operator")), json=body)


def code(response: Any) -> str:
    return str(response.json()["detail"]["code"])


def toy(hub: HubEmulator) -> Repo:
    return hub.hub.repos[("model", "org/toy")]


def test_repo_id_alone_resolves_main_to_a_commit_with_every_size_and_sha256(client, db, hub):
    tid = tenant(db, "hub-name-only")
    created = create(client, tid, repo_id="org/toy")
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["revision"] == "main" and task["commit"] == toy(hub).refs["main"] and task["repo_type"] == "model"
    assert task["file_count"] == len(FILES) and task["total_bytes"] == sum(map(len, FILES.values()))
    got = client.get(f"/api/v1/tasks/{task['id']}", headers=bearer(token(tid, "tenant_viewer"))).json()
    assert got["commit"] == task["commit"]
    # git-stored files were hashed by the API, LFS files carry the hub's lfs.oid: all are sha256.
    assert {f["path"]: (f["size"], f["sha256"]) for f in got["files"]} == {
        p: (len(c), sha(c)) for p, c in FILES.items()
    }
    with db.owner() as conn:
        row = conn.execute(
            'SELECT "commit", revision, repo_type FROM reporting.tasks WHERE task_id = %s', (task["id"],)
        ).fetchone()
    assert row == (task["commit"], "main", "model")


def test_include_and_exclude_follow_huggingface_hub_patterns(client, db):
    tid = tenant(db, "hub-patterns")
    created = create(
        client, tid, repo_id="org/toy", include=["*.safetensors", "tokenizer/", "*.json"], exclude=["model-00002*"]
    )
    assert created.status_code == 201, created.text
    files = client.get(f"/api/v1/tasks/{created.json()['id']}", headers=bearer(token(tid, "tenant_viewer"))).json()
    assert sorted(f["path"] for f in files["files"]) == [
        "config.json",
        "model-00001.safetensors",
        "tokenizer/tokenizer.json",
    ]
    empty = create(client, tid, repo_id="org/toy", include=["*.gguf"])
    assert empty.status_code == 422 and code(empty) == "EMPTY_SELECTION"
    both = create(client, tid, repo_id="org/toy", include=["*"], files=[{"path": "config.json", "size": 1}])
    assert both.status_code == 422 and code(both) == "FILES_OR_PATTERNS"


def test_tags_commits_and_datasets(client, db, hub):
    tid = tenant(db, "hub-kinds")
    repo = toy(hub)
    repo.tag("v1.0", repo.refs["main"])
    by_tag = create(client, tid, repo_id="org/toy", revision="v1.0", include=["README.md"])
    assert by_tag.status_code == 201 and by_tag.json()["commit"] == repo.refs["main"]
    by_commit = create(client, tid, repo_id="org/toy", revision=repo.refs["main"], include=["README.md"])
    assert by_commit.status_code == 201 and by_commit.json()["commit"] == repo.refs["main"]
    data = create(client, tid, repo_id="org/data", repo_type="dataset")
    assert data.status_code == 201, data.text
    assert data.json()["repo_type"] == "dataset" and data.json()["file_count"] == 2
    as_model = create(client, tid, repo_id="org/data")
    assert as_model.status_code == 422 and code(as_model) == "REPO_NOT_FOUND"


def test_a_client_list_is_checked_against_the_hub(client, db, hub):
    tid = tenant(db, "hub-client-list")
    good = create(client, tid, repo_id="org/toy", files=[{"path": "config.json", "size": len(FILES["config.json"])}])
    assert good.status_code == 201, good.text
    assert good.json()["commit"] == toy(hub).refs["main"]
    got = client.get(f"/api/v1/tasks/{good.json()['id']}", headers=bearer(token(tid, "tenant_viewer"))).json()
    assert got["files"][0]["sha256"] == sha(FILES["config.json"])  # completed from the hub
    cases = {
        "path": [{"path": "nope.bin", "size": 1}],
        "size": [{"path": "config.json", "size": 1}],
        "sha256": [{"path": "README.md", "size": len(FILES["README.md"]), "sha256": "0" * 64}],
    }
    for what, files in cases.items():
        refused = create(client, tid, repo_id="org/toy", files=files)
        assert refused.status_code == 422 and code(refused) == "MANIFEST_MISMATCH", refused.text
        assert refused.json()["detail"]["mismatch"] == what
    # When the hub cannot be asked, the client's own list is admitted as given, unresolved.
    hub.hub.faults.down = True
    offline = create(client, tid, repo_id="org/toy", files=[{"path": "anything.bin", "size": 3}])
    assert offline.status_code == 201 and offline.json()["commit"] is None


def test_unknown_repository_and_revision(client, db, hub):
    tid = tenant(db, "hub-unknown")
    missing = create(client, tid, repo_id="org/none")
    assert missing.status_code == 422 and code(missing) == "REPO_NOT_FOUND"
    private = hub.hub.repo("org/private", private=True)
    private.commit({"a.txt": b"a"})
    hidden = create(client, tid, repo_id="org/private")
    assert hidden.status_code == 422 and code(hidden) == "REPO_NOT_FOUND"  # the hub hides it, as the real one does
    revision = create(client, tid, repo_id="org/toy", revision="no-such-branch")
    assert revision.status_code == 422 and code(revision) == "REVISION_NOT_FOUND"


def test_gated_repository_needs_the_tenants_token(client, db):
    tid = tenant(db, "hub-gated")
    admin = bearer(token(tid, "tenant_admin"))
    refused = create(client, tid, repo_id="org/gated")
    assert refused.status_code == 422 and code(refused) == "HUB_ACCESS_DENIED"
    assert client.put("/api/v1/hub-token", headers=admin, json={"token": "hf_no_access"}).json() == {"outcome": "set"}
    still = create(client, tid, repo_id="org/gated")
    assert still.status_code == 422 and code(still) == "HUB_ACCESS_DENIED"
    rotated = client.put("/api/v1/hub-token", headers=admin, json={"token": "hf_granted"})
    assert rotated.json() == {"outcome": "rotated"}
    admitted = create(client, tid, repo_id="org/gated")
    assert admitted.status_code == 201, admitted.text
    assert client.delete("/api/v1/hub-token", headers=admin).status_code == 204
    again = create(client, tid, repo_id="org/gated")
    assert again.status_code == 422 and code(again) == "HUB_ACCESS_DENIED"


def test_hub_rate_limit_down_and_slow_are_503_in_bounded_time(client, db, hub):
    tid = tenant(db, "hub-unavailable")
    hub.hub.faults.rate_limited = 100
    limited = create(client, tid, repo_id="org/toy")
    assert limited.status_code == 503 and code(limited) == "HUB_UNAVAILABLE"
    assert limited.headers["Retry-After"] == "7"  # the hub's own
    hub.hub.faults.rate_limited = 0
    hub.hub.faults.down = True
    down = create(client, tid, repo_id="org/toy")
    assert down.status_code == 503 and code(down) == "HUB_UNAVAILABLE" and int(down.headers["Retry-After"]) > 0
    hub.hub.faults.down = False
    hub.hub.faults.delay = 2.5  # each answer: the per-request timeout (2 s) or the total (3 s) ends it
    started = time.monotonic()
    slow = create(client, tid, repo_id="org/toy")
    assert slow.status_code == 503 and code(slow) == "HUB_UNAVAILABLE"
    assert time.monotonic() - started < 10
    hub.hub.faults.delay = 0.0
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)).fetchone() == (0,)


def test_no_hub_at_all_is_503(db):
    settings = app_settings(db, hf_endpoint="http://127.0.0.1:9", hub_timeout_seconds=3)  # discard port: refused
    tid = tenant(db, "hub-none")
    with TestClient(create_app(settings)) as c:
        refused = create(c, tid, repo_id="org/toy")
    assert refused.status_code == 503 and code(refused) == "HUB_UNAVAILABLE"


def test_a_repository_of_twelve_thousand_files_over_paginated_listings(db, hub):
    repo = hub.hub.repo("org/huge")
    repo.commit({f"shards/{i:05d}.bin": i.to_bytes(4, "big") for i in range(12_000)})
    before = len(hub.hub.requests)
    tid = tenant(db, "hub-huge")
    # The module's client has tight timeouts for the slow-hub test; 13 pages take longer on a loaded machine.
    with TestClient(create_app(app_settings(db, hf_endpoint=hub.url, hub_timeout_seconds=120))) as big:
        created = create(big, tid, repo_id="org/huge")
    assert created.status_code == 201, created.text
    assert created.json()["file_count"] == 12_000 and created.json()["total_bytes"] == 48_000
    tree_pages = [p for _, p in hub.hub.requests[before:] if "/tree/" in p]
    assert len(tree_pages) == 13  # 12,000 files + 1 directory, 1,000 a page
    with db.owner() as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM dlw.task_files WHERE task_id = %s AND sha256 <> encode(sha256(int4send("
            "substr(path, 8, 5)::int)), 'hex')",
            (created.json()["id"],),
        ).fetchone()
    assert wrong == (0,)
