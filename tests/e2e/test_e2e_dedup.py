"""Deduplication within a storage target (docs/storage.md), end to end with real processes
(`dlw serve` + hub emulator + reference executors), measured on disk and on the wire:

- a content already stored and verified in the target is placed by a hard link, not
  downloaded: the second task gets 0 file bytes from the hub, and the bytes on disk (st_size
  summed over distinct inodes) do not grow; for both layouts, and huggingface_hub still reads
  the hf-cache offline;
- never across tenants or targets: the same content in another tenant's target, or in another
  target of the same tenant, is downloaded again and stored apart."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_e2e_hf_cache import add_target, create, read_offline, run_until_done, sha, task_of
from tests.support.database import MigratedDb
from tests.support.executors import quota_of
from tests.support.hub import HubEmulator, running_hub
from tests.support.tenants import tenant

A = {
    "config.json": b'{"model_type": "dedup"}',  # in git: no sha256 declared, counted by its own bytes
    "model.safetensors": os.urandom(300_000),  # LFS
    "extra.bin": os.urandom(120_000),  # LFS
}
# Another repository holding only contents A already has (under other names): all of it dedups.
B = {"weights/model.safetensors": A["model.safetensors"], "extra.bin": A["extra.bin"]}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with running_hub() as emulator:
        emulator.hub.repo("org/dedup-a").commit(A, lfs={"model.safetensors", "extra.bin"})
        emulator.hub.repo("org/dedup-b").commit(B, lfs=set(B))
        yield emulator


def disk_bytes(root: Path) -> int:
    """Bytes of content on disk under root: st_size of each distinct inode of a regular file
    (links not followed), so hard links count once; hf-cache refs (a commit id each) left out."""
    seen: dict[tuple[int, int], int] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file() and not path.is_symlink() and "refs" not in path.relative_to(root).parts[1:2]:
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def run_task(api: str, hub: HubEmulator, work: Path, tid: int, **body: Any) -> tuple[dict[str, Any], int, str]:
    """Create a task, run an executor until it ends; (the task, file bytes the hub served, log)."""
    made = create(api, tid, **body)
    before = hub.content_bytes
    log = run_until_done(api, hub, [work / "default", work / "store"], tid, [made["id"]])
    task = task_of(api, tid, made["id"])
    assert task["status"] == "succeeded", (task, log)
    return made, hub.content_bytes - before, log


def registry(db: MigratedDb, tid: int) -> dict[str, int]:
    with db.owner() as conn:
        rows = conn.execute("SELECT sha256, size FROM dlw.stored_blobs WHERE tenant_id = %s", (tid,)).fetchall()
    return dict(rows)


DISTINCT = sum(len(c) for c in A.values())


@pytest.mark.parametrize("layout", ["tree", "hf-cache"])
def test_a_content_already_in_the_target_is_linked_not_downloaded(db, api, hub, work, layout):
    tid = tenant(db, f"e2e-dedup-{layout}", concurrent=0)
    root = work / "store" / "mine"
    add_target(api, tid, "t", {"root": str(root), "layout": layout})

    first, fetched, _ = run_task(api, hub, work, tid, repo_id="org/dedup-a", revision="main", storage_target="t")
    assert fetched == DISTINCT
    assert disk_bytes(root) == DISTINCT

    second, fetched, log = run_task(api, hub, work, tid, repo_id="org/dedup-b", revision="main", storage_target="t")
    assert fetched == 0, log  # not one file byte from the hub
    assert disk_bytes(root) == DISTINCT  # and nothing more on disk
    assert log.count("placed from the stored copy") == len(B), log
    assert registry(db, tid) == {sha(c): len(c) for c in A.values()}  # once per distinct content
    used = quota_of(api, tid)
    assert used["storage_bytes_used"] == DISTINCT and used["storage_gb_used"] == 1

    if layout == "tree":
        for path, content in B.items():
            got = root / "org" / "dedup-b" / "main" / path
            assert got.read_bytes() == content
            original = root / "org" / "dedup-a" / "main" / ("model.safetensors" if "model" in path else path)
            assert os.stat(got).st_ino == os.stat(original).st_ino  # one inode, two names
    else:
        want = {path: sha(content) for path, content in B.items()}
        got = read_offline(root, "org/dedup-b", "model", sorted(B), "main", second["commit"])
        for revision in ("main", second["commit"]):
            assert got[revision] == {"hf_hub_download": want, "snapshot_download": want}, revision
        blobs = root / "models--org--dedup-b" / "blobs"
        assert {p.name for p in blobs.iterdir()} == {sha(c) for c in B.values()}  # no partial left
        for path in B:
            link = root / "models--org--dedup-b" / "snapshots" / second["commit"] / path
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        a_blob = root / "models--org--dedup-a" / "blobs" / sha(A["extra.bin"])
        assert os.stat(blobs / sha(A["extra.bin"])).st_ino == os.stat(a_blob).st_ino
        # The first repository still reads back whole.
        a_want = {path: sha(content) for path, content in A.items()}
        assert (
            read_offline(root, "org/dedup-a", "model", sorted(A), first["commit"])[first["commit"]]["snapshot_download"]
            == a_want
        )

    with db.owner() as conn:
        files = conn.execute(
            "SELECT path, stored_path, blob_sha256 FROM dlw.task_files WHERE tenant_id = %s AND task_id = %s",
            (tid, second["id"]),
        ).fetchall()
    assert {p: (s is not None, b) for p, s, b in files} == {p: (True, sha(c)) for p, c in B.items()}


def test_dedup_never_crosses_tenants_or_targets(db, api, hub, work):
    one = tenant(db, "e2e-dedup-iso-one", concurrent=0)
    two = tenant(db, "e2e-dedup-iso-two", concurrent=0)
    add_target(api, one, "t", {"root": str(work / "store" / "one"), "layout": "tree"})
    add_target(api, one, "other", {"root": str(work / "store" / "one-other"), "layout": "tree"})
    add_target(api, two, "t", {"root": str(work / "store" / "two"), "layout": "tree"})
    _, fetched, _ = run_task(api, hub, work, one, repo_id="org/dedup-a", revision="main", storage_target="t")
    assert fetched == DISTINCT

    # Another tenant, the same contents: downloaded again, into its own files.
    _, fetched, log = run_task(api, hub, work, two, repo_id="org/dedup-b", revision="main", storage_target="t")
    assert fetched == sum(len(c) for c in B.values()) and "stored copy" not in log
    mine = work / "store" / "one" / "org" / "dedup-a" / "main" / "extra.bin"
    theirs = work / "store" / "two" / "org" / "dedup-b" / "main" / "extra.bin"
    assert theirs.read_bytes() == A["extra.bin"] and os.stat(theirs).st_ino != os.stat(mine).st_ino
    assert disk_bytes(work / "store" / "two") == sum(len(c) for c in B.values())
    assert registry(db, two) == {sha(c): len(c) for c in B.values()}
    assert quota_of(api, two)["storage_bytes_used"] == sum(len(c) for c in B.values())
    assert quota_of(api, one)["storage_bytes_used"] == DISTINCT  # undisturbed

    # Another target of the same tenant: downloaded again too.
    _, fetched, log = run_task(api, hub, work, one, repo_id="org/dedup-b", revision="main", storage_target="other")
    assert fetched == sum(len(c) for c in B.values()) and "stored copy" not in log
    assert quota_of(api, one)["storage_bytes_used"] == DISTINCT + sum(len(c) for c in B.values())
