"""How the reference executor carries out a deletion plan (app/executor/deletion.py), on a real
filesystem: links are removed, never followed; a snapshot entry that points out of its blobs/
directory takes nothing else with it; a place already missing is success (a second attempt);
hard-linked bytes another path holds stay; unsafe names and unserved roots are refused before
anything is removed."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from app.executor import deletion as deletion_module
from app.executor.deletion import ClaimedDeletion, carry_out
from app.executor.layout import Unreachable, UnsafePath

COMMIT = "c" * 40


def deletion(root: Path | None, layout: str, files: list[dict[str, Any]], **plan: Any) -> ClaimedDeletion:
    spec = {
        "layout": layout,
        "root": None if root is None else str(root),
        "repo_type": "model",
        "repo_id": "org/m",
        "revision": "main",
        "commit": COMMIT,
        "remove_ref": True,
        "files": [{"id": f"id{i}", "sha256": None, "size": 1, **f} for i, f in enumerate(files)],
        **plan,
    }
    return ClaimedDeletion(id="d1", task_id="t1", tenant="acme", token="tok", lease_seconds=60, plan=spec)


def hf_repo(root: Path) -> Path:
    repo = root / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def test_hf_cache_links_removed_not_followed_and_foreign_targets_untouched(tmp_path: Path):
    root = tmp_path / "cache"
    repo = hf_repo(root)
    mine = "a" * 64  # blobs are named by the hub's ETag: a sha256 or a git blob id
    (repo / "blobs" / mine).write_bytes(b"mine")
    os.symlink(f"../../blobs/{mine}", repo / "snapshots" / COMMIT / "mine.bin")
    (repo / "blobs" / "notes.txt").write_bytes(b"not a blob")  # a name no blob has: never removed
    os.symlink("../../blobs/notes.txt", repo / "snapshots" / COMMIT / "odd.bin")
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"not DLW's")
    os.symlink(str(outside), repo / "snapshots" / COMMIT / "abs.bin")  # absolute: not ours to follow
    os.symlink("../../../../precious.bin", repo / "snapshots" / COMMIT / "rel.bin")  # out of blobs/
    plan = deletion(
        root,
        "hf-cache",
        [
            {"path": "mine.bin", "remove_path": True, "remove_blob": True},
            {"path": "abs.bin", "remove_path": True, "remove_blob": True},
            {"path": "rel.bin", "remove_path": True, "remove_blob": True},
            {"path": "odd.bin", "remove_path": True, "remove_blob": True},
            {"path": "gone.bin", "remove_path": True, "remove_blob": True},  # never written: success
        ],
    )
    done = carry_out([tmp_path / "default", tmp_path], plan)
    assert outside.read_bytes() == b"not DLW's"
    assert done.blobs == 1 and done.bytes == 4 and done.refs == 1
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == ["notes.txt"]  # kept, so the repo stays
    (repo / "blobs" / "notes.txt").unlink()
    again = carry_out([tmp_path / "default", tmp_path], plan)  # a second attempt: everything already missing
    assert (again.files, again.blobs, again.bytes) == (0, 0, 0)
    assert not repo.exists() and root.exists()  # emptied and pruned up to the root, not beyond


def test_what_the_plan_keeps_stays_and_a_moved_ref_is_left(tmp_path: Path):
    root = tmp_path / "cache"
    repo = hf_repo(root)
    (repo / "refs" / "main").write_text("d" * 40)  # another task moved the branch meanwhile
    kept = "b" * 64
    (repo / "blobs" / kept).write_bytes(b"shared")
    os.symlink(f"../../blobs/{kept}", repo / "snapshots" / COMMIT / "shared.bin")
    plan = deletion(root, "hf-cache", [{"path": "shared.bin", "remove_path": False, "remove_blob": False}])
    carry_out([tmp_path / "default", tmp_path], plan)
    assert (repo / "snapshots" / COMMIT / "shared.bin").read_bytes() == b"shared"
    assert (repo / "refs" / "main").read_text() == "d" * 40


def test_tree_hard_links_free_nothing_until_the_last_and_partials_go(tmp_path: Path):
    root = tmp_path / "plain"
    tree = root / "org" / "m" / "main"
    tree.mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"12345")
    os.link(tree / "a.bin", tmp_path / "other-copy")  # deduplicated: another path holds the bytes
    (tree / ".b.bin.id1.part").write_bytes(b"partial")
    plan = deletion(
        root,
        "tree",
        [{"path": "a.bin", "remove_path": True}, {"path": "b.bin", "remove_path": True}],
    )
    done = carry_out([tmp_path / "default", tmp_path], plan)
    assert done.files == 1 and done.bytes == 0  # unlinked, but the other link keeps the bytes
    assert (tmp_path / "other-copy").read_bytes() == b"12345"
    assert not (root / "org").exists() and root.exists()


def test_refusals_come_before_any_removal(tmp_path: Path):
    root = tmp_path / "plain"
    (root / "org" / "m" / "main").mkdir(parents=True)
    keep = root / "org" / "m" / "main" / "a.bin"
    keep.write_bytes(b"x")
    unsafe = deletion(root, "tree", [{"path": "a.bin", "remove_path": True}, {"path": "../../x", "remove_path": True}])
    with pytest.raises(UnsafePath):
        carry_out([tmp_path / "default", tmp_path], unsafe)
    with pytest.raises(Unreachable):
        carry_out(
            [tmp_path / "default", tmp_path / "elsewhere"],
            deletion(root, "tree", [{"path": "a.bin", "remove_path": True}]),
        )
    assert keep.exists()


def test_a_directory_swapped_for_a_link_after_the_check_takes_nothing_outside(tmp_path: Path, monkeypatch):
    """The tenant can write under its root: between placement()'s check and the removal it swaps
    its directory for a link to another tenant's (injected here right after the real placement).
    The removal is refused; the other tenant's file of the same name stays."""
    root = tmp_path / "plain"
    tree = root / "org" / "m" / "main"
    tree.mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"mine")
    theirs = tmp_path / "other-tenant" / "main"
    theirs.mkdir(parents=True)
    (theirs / "a.bin").write_bytes(b"theirs")
    checked = deletion_module.placement

    def then_swapped(storages: Any, item: Any) -> Any:
        place = checked(storages, item)
        if not tree.is_symlink():
            shutil.rmtree(tree)
            os.symlink(theirs, tree)
        return place

    monkeypatch.setattr(deletion_module, "placement", then_swapped)
    with pytest.raises(UnsafePath, match="leads out of the target"):
        carry_out([tmp_path / "default", tmp_path], deletion(root, "tree", [{"path": "a.bin", "remove_path": True}]))
    assert (theirs / "a.bin").read_bytes() == b"theirs"


def test_a_fifo_in_place_of_the_ref_does_not_hold_the_deletion(tmp_path: Path):
    """refs/<revision> is read to see whether it still names the commit: a FIFO the tenant put
    there is not waited on (the deletion thread serves every tenant), and is not removed."""
    root = tmp_path / "cache"
    repo = hf_repo(root)
    (repo / "refs" / "main").unlink()
    os.mkfifo(repo / "refs" / "main")
    plan = deletion(root, "hf-cache", [{"path": "w.bin", "remove_path": True, "remove_blob": False}])
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(carry_out([tmp_path / "default", tmp_path], plan)))
    worker.daemon = True
    worker.start()
    worker.join(10)
    if worker.is_alive():  # held on the FIFO: let it go, then fail
        os.close(os.open(repo / "refs" / "main", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the deletion waited on a FIFO in place of the ref")
    assert outcome and outcome[0].refs == 0 and (repo / "refs" / "main").exists()
