"""Storage targets decide where files go (docs/storage.md), end to end with real processes
(`dlw serve` + hub emulator + reference executors with several --storage roots):

- an `hf-cache` target is read back by the real huggingface_hub, offline (HF_HUB_OFFLINE=1,
  local_files_only=True): hf_hub_download and snapshot_download return the right bytes for the
  branch name and for the commit, for a model and a dataset; blobs are named as the hub's ETag
  (sha256 for LFS files, the git blob id for git files), snapshot entries are relative links;
- a `tree` target with a root gets the plain tree under that root;
- a target whose root no --storage root of the executor holds is given back and its task fails
  with a message saying so, with nothing written there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import server
from tests.support.app import bearer, token
from tests.support.executors import run_until_finished, task_of
from tests.support.hub import HubEmulator, git_blob_oid, running_hub
from tests.support.tenants import tenant

MODEL = {
    "config.json": b'{"model_type": "cache"}',  # stored in git
    "README.md": b"# cache\n",  # stored in git
    "model.safetensors": os.urandom(250_000),  # LFS
    "sub/dir/weights.bin": os.urandom(70_000),  # LFS, nested
}
DATASET = {"data/train.parquet": os.urandom(40_000), "README.md": b"# ds\n"}
LFS = {"model.safetensors", "sub/dir/weights.bin", "data/train.parquet"}

# Run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
READER = """
import hashlib, json, os, sys
from pathlib import Path
from huggingface_hub import hf_hub_download, snapshot_download
cache, repo_id, repo_type, files = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = {}
for revision in sys.argv[5:]:
    one = {f: hashlib.sha256(Path(hf_hub_download(repo_id, f, repo_type=repo_type, revision=revision,
           cache_dir=cache, local_files_only=True)).read_bytes()).hexdigest() for f in files}
    snap = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                  local_files_only=True))
    whole = {str(p.relative_to(snap)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in snap.rglob("*") if p.is_file()}
    out[revision] = {"hf_hub_download": one, "snapshot_download": whole}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with running_hub() as emulator:
        emulator.hub.repo("org/cache").commit(MODEL, lfs={"model.safetensors", "sub/dir/weights.bin"})
        emulator.hub.repo("org/ds", repo_type="dataset").commit(DATASET, lfs={"data/train.parquet"})
        yield emulator


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dlw-e2e-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def add_target(api: str, tid: int, name: str, config: dict[str, Any]) -> None:
    made = httpx.post(
        f"{api}/api/v1/storage-targets",
        headers=bearer(token(tid, "tenant_admin")),
        json={"name": name, "config": config},
        timeout=10,
    )
    assert made.status_code == 201, made.text


def create(api: str, tid: int, **body: Any) -> dict[str, Any]:
    made = httpx.post(f"{api}/api/v1/tasks", headers=bearer(token(tid, "tenant_operator")), json=body, timeout=30)
    assert made.status_code == 201, made.text
    return dict(made.json())


def run_until_done(api: str, hub: HubEmulator, storages: list[Path], tid: int, task_ids: list[str]) -> str:
    return run_until_finished(api, hub, storages, f"cache-{tid}", tid, task_ids)


def read_offline(cache: Path, repo_id: str, repo_type: str, files: list[str], *revisions: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf-home")}
    ran = subprocess.run(
        [sys.executable, "-c", READER, str(cache), repo_id, repo_type, json.dumps(files), *revisions],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    return dict(json.loads(ran.stdout))


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_hf_cache_target_is_read_offline_by_huggingface_hub(db, api, hub, work):
    tid = tenant(db, "e2e-cache-hf", concurrent=0)
    default, extra = work / "default", work / "extra"
    cache = extra / "tenant-hf" / "cache"  # inside the executor's second --storage root
    add_target(api, tid, "hf", {"root": str(cache), "layout": "hf-cache"})
    model = create(api, tid, repo_id="org/cache", revision="main", storage_target="hf")
    dataset = create(api, tid, repo_id="org/ds", repo_type="dataset", storage_target="hf")
    log = run_until_done(api, hub, [default, extra], tid, [model["id"], dataset["id"]])
    for made in (model, dataset):
        assert task_of(api, tid, made["id"])["status"] == "succeeded", (task_of(api, tid, made["id"]), log)
    assert not (default / "e2e-cache-hf").exists()  # nothing went to the default storage

    commit = model["commit"]
    got = read_offline(cache, "org/cache", "model", sorted(MODEL), "main", commit)
    want = {path: sha(content) for path, content in MODEL.items()}
    for revision in ("main", commit):
        assert got[revision] == {"hf_hub_download": want, "snapshot_download": want}, revision
    ds = read_offline(cache, "org/ds", "dataset", sorted(DATASET), "main", dataset["commit"])
    ds_want = {path: sha(content) for path, content in DATASET.items()}
    assert ds["main"]["snapshot_download"] == ds_want and ds[dataset["commit"]]["hf_hub_download"] == ds_want

    # Exactly huggingface_hub's layout: blobs named by the hub's ETag, relative links, the ref.
    repo_dir = cache / "models--org--cache"
    assert (repo_dir / "refs" / "main").read_text() == commit
    blobs = {p.name for p in (repo_dir / "blobs").iterdir()}
    assert blobs == {sha(c) if p in LFS else git_blob_oid(c) for p, c in MODEL.items()}  # no partial left
    for path, content in MODEL.items():
        link = repo_dir / "snapshots" / commit / path
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo_dir / "blobs").resolve() and link.read_bytes() == content
    assert not [p for p in cache.rglob("*") if p.name.startswith(".") or p.name.endswith(".incomplete")]
    assert (cache / "datasets--org--ds" / "refs" / "main").read_text() == dataset["commit"]


def test_tree_target_with_a_root_gets_the_plain_tree(db, api, hub, work):
    tid = tenant(db, "e2e-cache-tree", concurrent=0)
    default, extra = work / "default", work / "extra"
    add_target(api, tid, "plain", {"root": str(extra / "plain"), "layout": "tree"})
    made = create(api, tid, repo_id="org/cache", revision="main", storage_target="plain")
    run_until_done(api, hub, [default, extra], tid, [made["id"]])
    assert task_of(api, tid, made["id"])["status"] == "succeeded"
    root = extra / "plain" / "org" / "cache" / "main"
    assert {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} == MODEL


def test_a_root_the_executor_does_not_serve_is_given_back_and_the_task_fails_saying_why(db, hub, work):
    # Its own server with 2 attempts: each retryable failure may wait for a backoff before the
    # file is offered again, and this test is about the message, not the number of attempts.
    with server.running_server(db, DLW_HF_ENDPOINT=hub.url, DLW_EXECUTOR_MAX_ATTEMPTS="2") as api:
        tid = tenant(db, "e2e-cache-away", concurrent=0)
        elsewhere = work / "not-served" / "cache"
        add_target(api, tid, "away", {"root": str(elsewhere), "layout": "hf-cache"})
        made = create(api, tid, repo_id="org/ds", repo_type="dataset", storage_target="away")
        run_until_done(api, hub, [work / "default"], tid, [made["id"]])
        task = task_of(api, tid, made["id"])
    assert task["status"] == "failed", task
    assert "is not under any --storage root" in task["error"], task
    assert any("is not under any --storage root" in (f["error"] or "") for f in task["files"]), task
    assert all(f["attempts"] <= 2 for f in task["files"]), task
    assert not elsewhere.exists()
