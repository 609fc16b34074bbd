"""Deleting a task's files as the database planned it (docs/storage.md, "Deleting").

The plan names, per file, whether its place goes (tree: the file; hf-cache: the snapshot entry)
and, for hf-cache, whether the blob that entry points to goes too; and whether refs/<revision>
goes. Places are computed exactly as for downloads (app/executor/layout.py: the same roots, the
same refusals of unsafe names and unserved roots). Removing is unlinking: a link is removed,
never followed, and a blob is removed only when the snapshot entry is a relative link to a name
directly in the repository's own blobs/ directory. A place already missing is success (a second
attempt after a lost report does the same again). Partial downloads of the task's files (named
after the file id) go in any case. Directories left empty are removed, up to the target root.
Every removal is made through a descriptor of its directory checked to be the one placement()
built (app/executor/anchored.py): a directory swapped for a link since is refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.executor.anchored import directory, remove
from app.executor.client import Claimed
from app.executor.layout import BLOB_NAME, placement

__all__ = ["ClaimedDeletion", "carry_out"]

REF_MAX_BYTES = 256  # a ref holds a commit (40 hex digits) and maybe a newline


@dataclass(frozen=True)
class ClaimedDeletion:
    """One deletion we hold a lease on, as the claim returned it."""

    id: str
    task_id: str
    tenant: str
    token: str
    lease_seconds: int
    plan: dict[str, Any]

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> ClaimedDeletion:
        return cls(
            id=str(item["id"]),
            task_id=str(item["task_id"]),
            tenant=str(item["tenant"]),
            token=str(item["assignment_token"]),
            lease_seconds=int(item["lease_seconds"]),
            plan=dict(item["plan"]),
        )


@dataclass
class Removed:
    """What one deletion removed, for the log and the tests."""

    files: int = 0
    blobs: int = 0
    refs: int = 0
    bytes: int = 0


def _as_claimed(deletion: ClaimedDeletion, spec: dict[str, Any]) -> Claimed:
    plan = deletion.plan
    return Claimed(
        id=str(spec["id"]),
        tenant=deletion.tenant,
        repo_id=str(plan["repo_id"]),
        revision=str(plan["revision"]),
        path=str(spec["path"]),
        size=int(spec["size"]),
        sha256=spec.get("sha256"),
        token=deletion.token,
        lease_seconds=deletion.lease_seconds,
        repo_type=str(plan["repo_type"]),
        commit=plan.get("commit"),
        storage_root=plan.get("root"),
        storage_layout=str(plan["layout"]),
    )


def _unlink(base: Path, path: Path) -> int | None:
    """Remove one name, never following it (anchored.remove): None when it was missing, else the
    bytes this freed (a regular file's size when this was its last name, 0 otherwise: a link, or
    a file another hard link still holds)."""
    info = remove(base, path)
    if info is None:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 else 0


def _blob_of(link: Path, blobs: Path) -> Path | None:
    """The blob a snapshot entry points to, when it is a relative link to a blob name (an ETag:
    40 or 64 hex digits) directly in the repository's blobs/ directory, as placement resolved it
    (what the executor writes); anything else is not followed."""
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    if os.path.isabs(target):
        return None
    resolved = Path(os.path.normpath(link.parent / target))
    if resolved.parent != blobs or not BLOB_NAME.fullmatch(resolved.name):
        return None
    return resolved


def _prune(base: Path, start: Path, stop: Path) -> None:
    """Remove the directories from start up to (not including) stop while they are empty, each
    from its parent's anchored directory."""
    current = start
    while current != stop and current.is_relative_to(stop) and current.is_relative_to(base):
        with directory(base, current.parent) as fd:
            if fd is not None:  # else its parent is gone: nothing to remove here, go on up
                try:
                    os.rmdir(current.name, dir_fd=fd)
                except FileNotFoundError:
                    pass  # gone already: go on up
                except OSError:  # not empty: stop here
                    return
        current = current.parent


def carry_out(storages: Sequence[Path], deletion: ClaimedDeletion) -> Removed:
    """Remove what the plan says. Raises layout.Unreachable for a root this executor does not
    serve and layout.UnsafePath for a name that would leave it (both before removing anything),
    OSError for a removal that failed."""
    plan = deletion.plan
    specs = list(plan.get("files") or [])
    places = [(spec, placement(storages, _as_claimed(deletion, spec))) for spec in specs]  # refusals first
    done = Removed()
    if not places:
        return done
    base = places[0][1].base  # one target for the whole plan: its base, as placement() resolved it
    for spec, place in places:
        _unlink(base, place.partial)
        if place.link is None:  # tree
            freed = _unlink(base, place.final) if spec["remove_path"] else None
            if freed is not None:
                done.files += 1
                done.bytes += freed
            _prune(base, place.final.parent, base)
            continue
        assert place.repo_dir is not None
        blob = _blob_of(place.link, place.final) if spec["remove_blob"] else None
        sha256 = str(spec.get("sha256") or "")
        if spec["remove_blob"] and blob is None and BLOB_NAME.fullmatch(sha256) and not os.path.lexists(place.link):
            # An earlier attempt removed the entry and stopped before its blob: an LFS file's blob
            # is named by its sha256 (a git file's by its blob id, which the plan cannot name).
            blob = place.final / sha256
        if spec["remove_path"]:
            # The entry first, then its blob: a reader never finds an entry pointing nowhere.
            done.files += _unlink(base, place.link) is not None
            _prune(base, place.link.parent, place.repo_dir / "snapshots")
        freed = _unlink(base, blob) if blob is not None else None
        if freed is not None:
            done.blobs += 1
            done.bytes += freed
    if plan["layout"] == "hf-cache":
        repo_dir, commit, ref = places[0][1].repo_dir, places[0][1].commit, places[0][1].ref
        assert repo_dir is not None and ref is not None
        if plan.get("remove_ref") and _names(base, ref, commit):
            done.refs += _unlink(base, ref) is not None
            _prune(base, ref.parent, repo_dir)
        for leftover in ("snapshots", "blobs", "refs"):
            _prune(base, repo_dir / leftover, repo_dir)
        _prune(base, repo_dir, base)
    return done


def _names(base: Path, ref: Path, commit: str | None) -> bool:
    """Whether refs/<revision> is a regular file naming this commit (another task may have moved
    it): opened in its anchored directory, never through a link, without blocking (a FIFO put
    there must not hold the deletion), and read no further than a ref could be."""
    try:
        with directory(base, ref.parent) as fd:
            if fd is None:
                return False
            opened = os.open(ref.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        with os.fdopen(opened, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            text = f.read(REF_MAX_BYTES + 1)
            return bool(commit) and len(text) <= REF_MAX_BYTES and text.strip() == str(commit).encode()
    except OSError:
        return False
