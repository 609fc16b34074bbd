"""File operations anchored at a target's base directory (docs/storage.md, "Where files go").

placement() checks a file's path when it computes it, but a tenant that can write under its
root could swap a directory on that path for a symbolic link afterwards, to have the executor
write, link or remove somewhere else (another tenant's tree). So every write, link, rename and
removal is made relative to a descriptor of its directory, checked to be that directory:
placement() returns paths whose directories hold no link (it resolves the ones it meets), so a
directory the kernel now finds under another name was reached through a link put there since,
and is refused (UnsafePath); missing directories are made one name at a time from the
executor's own --storage root, never through a link. What is done through the descriptor stays
in that directory, whatever is swapped after it was opened. Linux: the kernel's name of a
descriptor is read in /proc."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "UnsafePath",
    "directory",
    "existing_directory",
    "made_directory",
    "open_directory",
    "remove",
    "unlink_if_there",
]


class UnsafePath(ValueError):
    """A file whose destination would leave its storage directory."""


_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_WALK = _DIRECTORY | os.O_NOFOLLOW


def _names_below(base: str, directory: str) -> list[str]:
    if directory == base:
        return []
    if not directory.startswith(base + os.sep):
        raise UnsafePath(f"{directory} is not inside the target's directory {base}")
    names = directory[len(base) + 1 :].split(os.sep)
    if any(n in ("", ".", "..") for n in names):
        raise UnsafePath(f"unsafe name in {directory!r}")
    return names


def _check(fd: int, expected: str) -> int:
    """fd, when the kernel's name for the directory it holds is `expected` (a path placement()
    built without a link on it); else closed, UnsafePath. A directory reached through a link
    swapped in since has another name (its own), whatever is swapped back after the open. One
    removed since the open (no link left to it) is missing (FileNotFoundError), as if the open had
    not found it."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    if where != expected:
        # Removed since the open (no name left), not a directory renamed to "<name> (deleted)".
        removed = where == f"{expected} (deleted)" and os.fstat(fd).st_nlink == 0
        os.close(fd)
        if removed:
            raise FileNotFoundError(errno.ENOENT, "the directory was removed meanwhile", expected)
        raise UnsafePath(f"{expected} now leads out of the target's directory (to {where})")
    return fd


def _walk(start: str, names: list[str]) -> int:
    """The directory start/names, made where missing: `start` (one of the executor's own
    --storage roots, or the base), checked, then each name opened or made in its parent's
    descriptor, never through a link."""
    fd = _check(os.open(start, _DIRECTORY), start)  # made by `dlw executor run` at start, never here
    try:
        for name in names:
            try:
                below = os.open(name, _WALK, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile (another file of the directory): opened as any other
                below = os.open(name, _WALK, dir_fd=fd)
            os.close(fd)
            fd = below
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise UnsafePath(f"{start}/{'/'.join(names)}: a link or a file where placement found a directory") from exc
        raise
    return fd


def open_directory(base: Path, path: Path, *, made_from: Path | None = None) -> int | None:
    """An O_PATH descriptor of the directory `path` (base or inside it, as placement() built it:
    no link on the way), refused (UnsafePath) when the kernel finds it elsewhere now; None when it
    is missing, unless `made_from` (base, or the --storage root base lies in): then it is reached
    from there one name at a time, the missing directories (the base's own included) made in
    their parents' descriptors, never through a link. One open and one readlink when it exists
    (each small file's partial and publication: a walk costs more)."""
    home, where = str(base), str(path)
    _names_below(home, where)  # path is inside base
    try:
        return _check(os.open(where, _DIRECTORY), where)
    except (FileNotFoundError, NotADirectoryError):
        if made_from is None:
            return None
    return _walk(str(made_from), _names_below(str(made_from), where))


@contextmanager
def directory(base: Path, path: Path) -> Iterator[int | None]:
    """open_directory() of an existing directory (None when missing), closed when the block ends."""
    fd = open_directory(base, path)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def existing_directory(base: Path, path: Path) -> Iterator[int]:
    """directory(), FileNotFoundError when it is missing (the partial file's, which must be there)."""
    with directory(base, path) as fd:
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "the directory is gone", str(path))
        yield fd


@contextmanager
def made_directory(start: Path, base: Path, path: Path) -> Iterator[int]:
    """open_directory() with the missing directories made from `start` (the --storage root the
    base lies in), closed when the block ends."""
    fd = open_directory(base, path, made_from=start)
    assert fd is not None  # made when missing
    try:
        yield fd
    finally:
        os.close(fd)


def remove(base: Path, path: Path) -> os.stat_result | None:
    """Remove one name in its anchored directory, never following it: what it was (lstat), or
    None when it was missing. A directory is left alone (IsADirectoryError): DLW never writes one
    at a file's place."""
    with directory(base, path.parent) as fd:
        if fd is None:
            return None
        try:
            info = os.stat(path.name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory where a file was written", str(path))
        try:
            os.unlink(path.name, dir_fd=fd)
        except FileNotFoundError:
            return None
        return info


def unlink_if_there(name: str, fd: int) -> None:
    """Remove a name in an anchored directory (missing is fine)."""
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
