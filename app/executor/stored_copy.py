"""Deduplication on disk (docs/storage.md): a file whose content the claim says is already
stored in the same target is placed from that verified copy, a hard link where the file system
allows one, else a copy hashed on the way, instead of being downloaded."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from app.executor.anchored import UnsafePath, directory, unlink_if_there
from app.executor.client import Claimed
from app.executor.layout import Placement

__all__ = ["from_stored_copy"]

_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES}


def from_stored_copy(place: Placement, item: Claimed) -> str | None:
    """Deduplication (docs/storage.md): the claim named a verified copy of this content in the
    same target, so the file's partial becomes a hard link of it (the bytes are shared on disk),
    or, where linking is impossible (another file system, no hard links), a copy hashed on the
    way. Returns the sha256, or None when that copy cannot serve (gone, not a regular file of the
    declared size, other bytes): the file is then downloaded as usual. A link shares the inode of
    a copy verified when it was stored, so only its size is checked. Both names are reached
    through directories anchored at the target's base (anchored.py): a directory swapped for a
    link since is refused, so nothing outside the base is linked or read in."""
    if item.stored_path is None or item.sha256 is None:
        return None
    want = item.sha256.lower()
    try:
        source = place.copy_source(item.stored_path)  # an hf-cache snapshot entry is resolved to its blob
        with directory(place.base, source.parent) as src_dir:
            if src_dir is None:
                return None
            st = os.stat(source.name, dir_fd=src_dir, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size != item.size:
                return None
            with place.made_directory(place.partial.parent) as dst_dir:
                return _linked(src_dir, source.name, st, dst_dir, place.partial.name, want)
    except (UnsafePath, OSError):
        return None


def _linked(src_dir: int, source: str, st: os.stat_result, dst_dir: int, partial: str, want: str) -> str | None:
    unlink_if_there(partial, dst_dir)
    try:
        # The name itself, never a link that replaced it since; and only the file checked above.
        os.link(source, partial, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        linked = os.stat(partial, dir_fd=dst_dir, follow_symlinks=False)
        if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):
            return want
        unlink_if_there(partial, dst_dir)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            return None
    return _copied(src_dir, source, st.st_size, dst_dir, partial, want)


def _copied(src_dir: int, source: str, size: int, dst_dir: int, partial: str, want: str) -> str | None:
    """The copy where no hard link can be made, hashed on the way: kept only when it is `want`."""
    digest = hashlib.sha256()
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        with os.fdopen(src, "rb") as reader:
            # A new file (unlinked above), never one a link planted under the partial name points at.
            new = os.open(
                partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dst_dir
            )
            with os.fdopen(new, "wb") as writer:
                while chunk := reader.read(1 << 20):
                    digest.update(chunk)
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
                whole = os.fstat(writer.fileno()).st_size == size
    except OSError:
        unlink_if_there(partial, dst_dir)
        return None
    if digest.hexdigest() != want or not whole:
        unlink_if_there(partial, dst_dir)
        return None
    return want
