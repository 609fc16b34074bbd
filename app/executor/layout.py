"""Where a claimed file goes on disk (docs/storage.md): its storage target's root, or the
executor's default storage, in the target's layout.

- no root: `<first --storage>/<tenant>/<repo_id>/<revision>/<path>` (the default target);
- layout `tree`: `<root>/<repo_id>/<revision>/<path>`;
- layout `hf-cache`: what huggingface_hub reads as a cache_dir: `<root>/models--org--name/`
  (`datasets--...`) with `blobs/<etag>`, `snapshots/<commit>/<path>` a relative symlink to the
  blob, and `refs/<revision>` holding the commit.

A root is served only when it is one of the executor's --storage roots or inside one, reached
without a symbolic link, and (inside the first root, which holds the default trees) within its
own tenant's directory; any other root raises Unreachable. Publishing is
atomic: the verified bytes are renamed into place, links are made as a temporary link renamed
over the final name, refs written to a temporary file renamed over the ref, in that order, so a
reader never sees a partial blob or a dangling link."""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import re
import stat
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from app.executor import anchored
from app.executor.anchored import UnsafePath as UnsafePath  # raised here too: importable from here
from app.executor.anchored import existing_directory, unlink_if_there
from app.executor.client import Claimed

COMMIT = re.compile(r"[0-9a-f]{40}")  # fullmatch: "$" would also take a final newline
BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # an hf-cache blob: the hub's ETag (git blob id or sha256)
_ETAG = re.compile(r'^(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?$')


class Unreachable(ValueError):
    """A target root this executor does not serve (not under any of its --storage roots)."""


class NoCommit(ValueError):
    """An hf-cache target for a task without a resolved commit (snapshots are named by commit)."""


@dataclass(frozen=True)
class Placement:
    """One file's places: `partial` (the download in progress, named after the file id so a later
    attempt finds it) becomes `final`; for hf-cache, `final` is a blob whose name is decided once
    the bytes are known, and `link` the snapshot entry pointing at it."""

    partial: Path
    final: Path
    base: Path  # the target's base directory (its root, or <first --storage>/<tenant>), resolved
    link: Path | None = None  # hf-cache: snapshots/<commit>/<path>
    repo_dir: Path | None = None  # hf-cache: models--org--name
    commit: str | None = None
    ref: Path | None = None  # hf-cache: refs/<revision>, resolved and checked like the others
    # The executor's own --storage root the base lies in (resolved; it made it at start): missing
    # directories, the base's own included, are made from there (anchored.py). None: the base.
    root: Path | None = None

    def made_directory(self, path: Path) -> AbstractContextManager[int]:
        """anchored.made_directory() of a directory of this placement: missing directories made
        from the --storage root (or the base, for a placement built without one)."""
        return anchored.made_directory(self.root if self.root is not None else self.base, self.base, path)

    @property
    def stored_path(self) -> str:
        """Where the published file lies relative to the target's base directory (tree: the file;
        hf-cache: the snapshot entry, a link to its blob): what the completion reports."""
        where = self.link if self.link is not None else self.final
        home, path = str(self.base), str(where)  # a string prefix: Path.relative_to costs more per small file
        if path.startswith(home + "/"):
            return path[len(home) + 1 :]
        return where.relative_to(self.base).as_posix()

    def copy_source(self, stored_path: str) -> Path:
        """The verified copy a claim named (relative to the base), refusing anything outside it,
        through a link included (an hf-cache snapshot entry must lead to a blob under the base)."""
        parts = stored_path.split("/")
        if any(p in ("", ".", "..") or "\x00" in p for p in parts):
            raise UnsafePath(f"unsafe stored path {stored_path!r}")
        # Resolved: link(2) makes a hard link of a symbolic link itself, not of what it names.
        source = self.base.joinpath(*parts).resolve()
        if not source.is_relative_to(self.base) or source == self.base:
            raise UnsafePath(f"stored path {stored_path!r} resolves outside the storage directory")
        return source


def _segments(item: Claimed, *names: str) -> list[str]:
    parts = [p for name in names for p in name.split("/")]
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\x00" in part or part.startswith("~"):
            raise UnsafePath(f"unsafe path segment {part!r} in {item.repo_id}@{item.revision}:{item.path}")
    return parts


def _inside(base: Path, parts: Sequence[str], item: Claimed) -> Path:
    """base/parts, refusing a result outside base. Every directory on the way is looked at (one
    lstat per name that exists: a small file's path costs a few microseconds, not a realpath
    walk from /). Each part must be one name, not "." or ".." (checked here; the callers pass
    names _segments validated), so while no directory is a symbolic link the path is base/parts
    as written, inside base, and built as a string (pathlib's joins and containment checks cost
    more than the lstats, per small file). Once a directory is a link, they are resolved as
    Path.resolve() does and the result is checked. The last name is not resolved: it may be a
    snapshot link, which must stay the link."""
    if not parts or any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        raise UnsafePath(f"unsafe name in {'/'.join(parts)!r}")
    path = str(base)
    for name in ("", *parts[:-1]):
        path = os.path.join(path, name) if name else path
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            break  # not there (or not a directory): nothing below it to follow
        if stat.S_ISLNK(mode):
            try:
                target = base.joinpath(*parts[:-1]).resolve() / parts[-1]
            except RuntimeError as exc:  # a loop of links (Python 3.11 raises this)
                raise UnsafePath(f"{item.path!r}: a loop of symbolic links") from exc
            if not target.is_relative_to(base) or target == base:
                raise UnsafePath(f"{item.path!r} resolves outside the storage directory")
            return target
    return Path(os.path.join(str(base), *parts))


@functools.lru_cache(maxsize=64)
def _own_root(root: Path) -> Path:
    """One of this executor's --storage roots, resolved once (its own configuration; the roots
    of targets and every path below a root are resolved on each use)."""
    return root.resolve()


def served_root(storages: Sequence[Path], root: str, tenant: str) -> tuple[Path, Path]:
    """The target root when it is one of `storages` or inside one, with that storage root
    (both resolved); else Unreachable. A root that goes through a symbolic link is refused too:
    the database keeps tenants' roots apart as written, and a link could make two of them one
    directory. Inside the first root, which holds every tenant's default tree at
    <first>/<tenant>/ (roots the database does not know), a target root must lie in its own
    tenant's directory; and none may contain the first root (storage roots nested with the first
    inside another)."""
    resolved = Path(root).resolve()
    if resolved != Path(root):
        raise Unreachable(f"storage root {root} goes through a symbolic link; give its real path")
    first = _own_root(storages[0])
    if resolved.is_relative_to(first):
        if resolved.is_relative_to(first / tenant):
            return resolved, first
        raise Unreachable(f"storage root {root} is in this executor's default storage but not in {tenant}/ there")
    if first.is_relative_to(resolved):
        # The database keeps the roots it knows apart, not this executor's default storage: a root
        # above it would reach every tenant's default tree (<root>/<repo_id>/<revision>/... can
        # name <first>/<tenant>/...).
        raise Unreachable(f"storage root {root} contains this executor's default storage {first}")
    for storage in storages[1:]:
        if resolved.is_relative_to(_own_root(storage)):
            return resolved, _own_root(storage)
    raise Unreachable(f"storage root {root} is not under any --storage root of this executor")


def repo_folder(item: Claimed) -> str:
    """huggingface_hub's repo_folder_name: models--org--name, datasets--org--name."""
    return "--".join([f"{_one_name(item, item.repo_type, 'repository type')}s", *_segments(item, item.repo_id)])


def _one_name(item: Claimed, value: str, what: str) -> str:
    """value, when it is one safe name (it becomes one directory or file name)."""
    if len(_segments(item, value)) != 1:
        raise UnsafePath(f"unsafe {what} {value!r}")
    return value


def placement(storages: Sequence[Path] | Path, item: Claimed) -> Placement:
    """Where the claimed file goes, refusing anything that would escape its directory. The
    server validated these names; this does not rely on it."""
    roots = [storages] if isinstance(storages, Path) else list(storages)
    # The tenant names its default directory, the file id the partial file: one name each.
    tenant = _one_name(item, item.tenant, "tenant")
    _one_name(item, item.id, "file id")
    if item.storage_root is None:
        # Everything is resolved and checked within the tenant's own directory, not the whole
        # default storage: a link there must not lead into another tenant's tree.
        storage = _own_root(roots[0])
        home = _inside(storage, [tenant], item)
    else:
        home, storage = served_root(roots, item.storage_root, item.tenant)
    if item.storage_layout != "hf-cache":
        target = _inside(home, _segments(item, item.repo_id, item.revision, item.path), item)
        folder, name = os.path.split(target)
        return Placement(Path(os.path.join(folder, f".{name}.{item.id}.part")), target, home, root=storage)
    commit = item.commit or (item.revision if COMMIT.fullmatch(item.revision) else None)
    if commit is None:
        raise NoCommit("the hf-cache layout needs the task's resolved commit, and this task has none")
    repo_dir = _inside(home, [repo_folder(item)], item)
    link = _inside(repo_dir, ["snapshots", _one_name(item, commit, "commit"), *_segments(item, item.path)], item)
    # blobs/ and refs/ resolved like every other directory: a link there must not take the bytes,
    # the ref or a deletion out of the repository folder.
    partial = _inside(repo_dir, ["blobs", f"{item.id}.incomplete"], item)
    ref = _inside(repo_dir, ["refs", *_segments(item, item.revision)], item)
    return Placement(partial, partial.parent, home, link, repo_dir, commit, ref, storage)


def git_blob_id(place: Placement) -> str:
    """The git blob id of the partial file: sha1 of "blob <size>\\0" + its bytes (the hub's ETag of
    a file stored in git)."""
    with existing_directory(place.base, place.partial.parent) as fd:
        opened = os.open(place.partial.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    with os.fdopen(opened, "rb") as f:
        digest = hashlib.sha1(f"blob {os.fstat(f.fileno()).st_size}\0".encode(), usedforsecurity=False)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hub_etag(url: str, headers: dict[str, str], timeout: float = 30.0) -> str | None:
    """The blob name huggingface_hub would use: X-Linked-Etag (an LFS file's sha256) or ETag (a
    git file's blob id) of a HEAD on the resolve URL, redirects not followed, as it does. None
    when the hub does not say."""
    parts = urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.netloc, timeout=timeout)
    try:
        conn.request("HEAD", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=headers)
        response = conn.getresponse()
        response.read()
        value = response.getheader("X-Linked-Etag") or response.getheader("ETag")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return etag_name(value)


def etag_name(value: str | None) -> str | None:
    """The id an X-Linked-Etag or ETag value carries (a sha256 or a git blob id), or None."""
    match = _ETAG.match(value.strip()) if value else None
    return match[1] if match else None


def blob_name(place: Placement, sha256: str, etag: str | None) -> str:
    """The hub's ETag when it names these bytes (their sha256, or their git blob id), else the
    sha256: a name never taken on the server's word alone, as it becomes a path."""
    if etag == sha256 or (etag is not None and len(etag) == 40 and etag == git_blob_id(place)):
        return etag
    return sha256


# Publishing writes only through directories anchored at the target's base (anchored.py): a
# directory swapped for a link since placement() is refused, not written through.


def _replace_link(place: Placement, source: str, link: Path, tag: str) -> None:
    tmp = f".{link.name}.{tag}.link"
    with place.made_directory(link.parent) as fd:
        unlink_if_there(tmp, fd)
        os.symlink(source, tmp, dir_fd=fd)
        os.replace(tmp, link.name, src_dir_fd=fd, dst_dir_fd=fd)


def _replace_text(place: Placement, path: Path, text: str, tag: str) -> None:
    """path holds text, replaced atomically. The temporary file is made new (O_EXCL, after any old
    one is removed), never opened through a link planted under its name, which would write there."""
    tmp = f".{path.name}.{tag}.tmp"
    with place.made_directory(path.parent) as fd:
        unlink_if_there(tmp, fd)
        new = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
        with os.fdopen(new, "w") as f:
            f.write(text)
        os.replace(tmp, path.name, src_dir_fd=fd, dst_dir_fd=fd)


def _rename_over(place: Placement, partial: Path, final: Path) -> None:
    """partial becomes final (a name in the same directory). When final is already a hard link
    of the same file (a copy placed from it), rename(2) would do nothing and leave partial
    behind: partial is removed instead."""
    assert partial.parent == final.parent
    with existing_directory(place.base, partial.parent) as fd:
        ours = os.stat(partial.name, dir_fd=fd, follow_symlinks=False)
        try:
            there = os.stat(final.name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
            os.unlink(partial.name, dir_fd=fd)
        else:
            os.replace(partial.name, final.name, src_dir_fd=fd, dst_dir_fd=fd)


def publish(place: Placement, item: Claimed, sha256: str, etag: str | None) -> Path:
    """Put verified bytes in place (blob, then link, then ref for hf-cache) and return where."""
    if place.link is None:
        _rename_over(place, place.partial, place.final)
        return place.final
    assert place.repo_dir is not None and place.commit is not None
    blob = place.final / blob_name(place, sha256, etag)
    _rename_over(place, place.partial, blob)  # same bytes under the same name: replacing is harmless
    _replace_link(place, os.path.relpath(blob, place.link.parent), place.link, item.id)
    if item.revision != place.commit:
        assert place.ref is not None
        _replace_text(place, place.ref, place.commit, item.id)
    return place.link
