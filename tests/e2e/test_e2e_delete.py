"""Deleting what was downloaded (docs/storage.md, "Deleting"), end to end with real processes:
`dlw serve`, the hub emulator and reference executors, which download two tasks sharing files
and then carry out their deletions. Bytes on disk are measured before and after each deletion:

- hf-cache: deleting the first task removes its snapshot entries, refs/<revision> and the blobs
  only it used; the second task's files stay, and the real huggingface_hub still reads its
  snapshot offline (HF_HUB_OFFLINE=1) with the right bytes; deleting the second frees the rest
  and leaves no repository folder;
- tree: a file both tasks have stays until both are deleted; empty directories go.
GET shows each task deleted with the storage its deletion released."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_e2e_hf_cache import READER, add_target, create, sha, task_of
from tests.support.app import bearer, token
from tests.support.executors import quota_of, start_executor, stop_executor, wait_for
from tests.support.hub import HubEmulator, running_hub
from tests.support.tenants import tenant

MODEL = {
    "config.json": b'{"model_type": "delete"}',  # git
    "README.md": b"# delete me\n",  # git
    "model.safetensors": os.urandom(120_000),  # LFS, shared by both tasks
    "sub/dir/weights.bin": os.urandom(50_000),  # LFS, the first task's only
}
SHARED = ["config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with running_hub() as emulator:
        emulator.hub.repo("org/del").commit(MODEL, lfs={"model.safetensors", "sub/dir/weights.bin"})
        yield emulator


def disk_bytes(root: Path) -> int:
    """Bytes of the distinct regular files under root (links not followed, hard links once)."""
    seen: dict[tuple[int, int], int] = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            info = os.lstat(os.path.join(folder, name))
            if os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name)):
                seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def run_until(api: str, hub: HubEmulator, storages: list[Path], tid: int, done: Any, what: str) -> None:
    """A reference executor (serving storages) runs until done() holds."""
    extra = [arg for root in storages[1:] for arg in ("--storage", str(root))]
    executor = start_executor(api, hub, storages[0], f"delete-{tid}", *extra)
    try:
        wait_for(done, 60, what, (executor,))
    finally:
        code, log = stop_executor(executor)
    assert code == 0, log


def delete(api: str, tid: int, task_id: str) -> dict[str, Any]:
    answer = httpx.delete(f"{api}/api/v1/tasks/{task_id}", headers=bearer(token(tid, "tenant_operator")), timeout=10)
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def deleted(api: str, tid: int, task_id: str, storages: list[Path], hub: HubEmulator) -> dict[str, Any]:
    assert delete(api, tid, task_id)["deletion"] == "deleting"
    run_until(api, hub, storages, tid, lambda: task_of(api, tid, task_id)["deletion"] == "deleted", task_id)
    shown = task_of(api, tid, task_id)
    assert shown["deletion_detail"]["status"] == "done", shown
    return shown


def storage_used(api: str, tid: int) -> int:
    """The tenant's storage figure (`GET /api/v1/quota/current`): the bytes of the distinct contents
    its targets hold, which a completed deletion releases."""
    return int(quota_of(api, tid)["storage_bytes_used"])


def succeeded(api: str, hub: HubEmulator, storages: list[Path], tid: int, *tasks: dict[str, Any]) -> None:
    run_until(
        api,
        hub,
        storages,
        tid,
        lambda: all(task_of(api, tid, t["id"])["status"] == "succeeded" for t in tasks),
        "downloads",
    )


def read_offline(cache: Path, files: list[str], revision: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf-home")}
    ran = subprocess.run(
        [sys.executable, "-c", READER, str(cache), "org/del", "model", json.dumps(files), revision],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    return dict(json.loads(ran.stdout))[revision]


def test_hf_cache_deletion_frees_what_only_it_used_and_the_other_snapshot_still_reads(db, api, hub, work):
    tid = tenant(db, "e2e-del-hf", concurrent=0)
    storages = [work / "default", work / "extra"]
    cache = storages[1] / "hf"
    add_target(api, tid, "hf", {"root": str(cache), "layout": "hf-cache"})
    first = create(api, tid, repo_id="org/del", revision="main", storage_target="hf")
    commit = first["commit"]
    second = create(api, tid, repo_id="org/del", revision=commit, include=SHARED, storage_target="hf")
    succeeded(api, hub, storages, tid, first, second)
    repo = cache / "models--org--del"
    everything = sum(len(c) for c in MODEL.values())
    # The blobs, and refs/main (the 40 characters of the commit).
    assert disk_bytes(cache) == everything + len(commit) and (repo / "refs" / "main").read_text() == commit
    assert storage_used(api, tid) == everything

    shown = deleted(api, tid, first["id"], storages, hub)
    alone = len(MODEL["README.md"]) + len(MODEL["sub/dir/weights.bin"])
    assert shown["deletion_detail"]["released_bytes"] == alone
    assert disk_bytes(cache) == everything - alone and storage_used(api, tid) == everything - alone
    assert files_under(repo) == {f"snapshots/{commit}/{p}" for p in SHARED} | {
        f"blobs/{name}" for name in (os.readlink(repo / "snapshots" / commit / p).rsplit("/", 1)[1] for p in SHARED)
    }
    assert not (repo / "refs").exists() and not (repo / "snapshots" / commit / "sub").exists()
    # The second task's snapshot, read back offline by the real huggingface_hub.
    want = {p: sha(MODEL[p]) for p in SHARED}
    assert read_offline(cache, SHARED, commit) == {"hf_hub_download": want, "snapshot_download": want}

    shown = deleted(api, tid, second["id"], storages, hub)
    assert shown["deletion_detail"]["released_bytes"] == everything - alone
    assert disk_bytes(cache) == 0 and not repo.exists() and storage_used(api, tid) == 0


def test_tree_deletion_keeps_a_shared_file_until_both_tasks_are_deleted(db, api, hub, work):
    tid = tenant(db, "e2e-del-tree", concurrent=0)
    storages = [work / "default", work / "extra"]
    root = storages[1] / "plain"
    add_target(api, tid, "plain", {"root": str(root), "layout": "tree"})
    first = create(api, tid, repo_id="org/del", revision="main", storage_target="plain")
    second = create(api, tid, repo_id="org/del", revision="main", include=["config.json"], storage_target="plain")
    succeeded(api, hub, storages, tid, first, second)
    tree = root / "org" / "del" / "main"
    assert disk_bytes(root) == sum(len(c) for c in MODEL.values()) == storage_used(api, tid)

    shown = deleted(api, tid, first["id"], storages, hub)
    assert shown["deletion_detail"]["released_bytes"] == sum(len(c) for p, c in MODEL.items() if p != "config.json")
    assert (
        files_under(root) == {"org/del/main/config.json"}
        and (tree / "config.json").read_bytes() == MODEL["config.json"]
    )
    assert disk_bytes(root) == len(MODEL["config.json"]) == storage_used(api, tid) and not (tree / "sub").exists()

    deleted(api, tid, second["id"], storages, hub)
    assert disk_bytes(root) == 0 == storage_used(api, tid) and not (root / "org").exists()
    # Deleted tasks stay listed, and deleting one again changes nothing.
    assert delete(api, tid, first["id"])["deletion"] == "deleted"
