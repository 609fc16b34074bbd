"""End to end from a repository name: real processes (`dlw serve` asking the hub emulator,
reference executors downloading from it). A task created with only repo_id and revision "main"
succeeds with every file verified against the hub's sha256 and stays on the commit it resolved
even when the branch moves before any executor claims it; include/exclude select; a gated
repository is refused without the tenant's token and downloaded with it (the executor has no
token of its own: the claim brings the tenant's)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.app import bearer, token
from tests.support.executors import run_until_finished, task_of
from tests.support.hub import HubEmulator, running_hub
from tests.support.tenants import tenant

ORIGINAL = {
    "config.json": b'{"model_type": "e2e"}',
    "README.md": b"# e2e\n",
    "model.safetensors": os.urandom(300_000),
    "extra/weights.bin": os.urandom(100_000),
}
GATED = {"config.json": b'{"gated": true}', "model.safetensors": os.urandom(120_000)}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with running_hub() as emulator:
        emulator.hub.repo("org/e2e").commit(ORIGINAL)
        gated = emulator.hub.repo("org/e2e-gated", gated="auto")
        gated.commit(GATED)
        emulator.hub.grant(gated, "hf_e2e_granted")
        yield emulator


@pytest.fixture
def storage() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dlw-e2e-hub-"))
    yield path / "storage"
    shutil.rmtree(path, ignore_errors=True)


def create(api: str, tid: int, **body: Any) -> httpx.Response:
    return httpx.post(f"{api}/api/v1/tasks", headers=bearer(token(tid, "tenant_operator")), json=body, timeout=30)


def run_until_done(api: str, hub: HubEmulator, storage: Path, tid: int, task_ids: list[str]) -> None:
    log = run_until_finished(api, hub, [storage], f"hub-{tid}", tid, task_ids)
    for task_id in task_ids:
        assert task_of(api, tid, task_id)["status"] == "succeeded", (task_of(api, tid, task_id), log)


def on_disk(storage: Path, slug: str, repo: str, revision: str) -> dict[str, bytes]:
    root = storage / slug / repo / revision
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_main_by_name_downloads_the_resolved_commit_even_after_the_branch_moves(db, api, hub, storage):
    tid = tenant(db, "e2e-hub-main", concurrent=0)
    whole = create(api, tid, repo_id="org/e2e", revision="main")
    assert whole.status_code == 201, whole.text
    picked = create(api, tid, repo_id="org/e2e", include=["*.json", "extra/"], exclude=["extra/*.txt"])
    assert picked.status_code == 201, picked.text
    repo = hub.hub.repos[("model", "org/e2e")]
    resolved = repo.refs["main"]
    assert whole.json()["commit"] == picked.json()["commit"] == resolved
    # The branch moves before any executor claims: every file changes content.
    moved = repo.commit({path: content + b"-v2" for path, content in ORIGINAL.items()}, title="v2")
    assert moved != resolved

    run_until_done(api, hub, storage, tid, [whole.json()["id"], picked.json()["id"]])
    files = task_of(api, tid, whole.json()["id"])["files"]
    assert {f["path"]: f["sha256"] for f in files} == {p: hashlib.sha256(c).hexdigest() for p, c in ORIGINAL.items()}
    assert on_disk(storage, "e2e-hub-main", "org/e2e", "main") == ORIGINAL  # the resolved commit's bytes
    assert sorted(f["path"] for f in task_of(api, tid, picked.json()["id"])["files"]) == [
        "config.json",
        "extra/weights.bin",
    ]
    downloads = {p for m, p in hub.hub.requests if m == "GET" and "/resolve/" in p}
    assert all(f"/resolve/{resolved}/" in p for p in downloads if "/org/e2e/" in p)  # never /resolve/main/


def test_gated_repository_with_and_without_the_tenants_token(db, api, hub, storage):
    tid = tenant(db, "e2e-hub-gated", concurrent=0)
    refused = create(api, tid, repo_id="org/e2e-gated")
    assert refused.status_code == 422 and refused.json()["detail"]["code"] == "HUB_ACCESS_DENIED"
    put = httpx.put(
        f"{api}/api/v1/hub-token",
        headers=bearer(token(tid, "tenant_admin")),
        json={"token": "hf_e2e_granted"},
        timeout=10,
    )
    assert put.status_code == 200, put.text
    created = create(api, tid, repo_id="org/e2e-gated")
    assert created.status_code == 201, created.text
    run_until_done(api, hub, storage, tid, [created.json()["id"]])
    assert on_disk(storage, "e2e-hub-gated", "org/e2e-gated", "main") == GATED
