"""Deduplication on disk (docs/storage.md): a file whose content the claim says is already
stored in the same target is placed from that verified copy, a hard link where the file system
allows one, else a copy hashed on the way, instead of being downloaded."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from app.executor.client import Claimed
from app.executor.layout import Placement, UnsafePath

__all__ = ["from_stored_copy"]

_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES}


def from_stored_copy(place: Placement, item: Claimed) -> str | None:
    """Deduplication (docs/storage.md): the claim named a verified copy of this content in the
    same target, so the file's partial becomes a hard link of it (the bytes are shared on disk),
    or, where linking is impossible (another file system, no hard links), a copy hashed on the
    way. Returns the sha256, or None when that copy cannot serve (gone, not a regular file of the
    declared size, other bytes): the file is then downloaded as usual. A link shares the inode of
    a copy verified when it was stored, so only its size is checked."""
    if item.stored_path is None or item.sha256 is None:
        return None
    want = item.sha256.lower()
    try:
        source = place.copy_source(item.stored_path)
        st = os.stat(source)  # an hf-cache snapshot entry is resolved to its blob
    except (UnsafePath, OSError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != item.size:
        return None
    place.partial.unlink(missing_ok=True)
    try:
        # The name itself, never a link that replaced it since; and only the file checked above.
        os.link(source, place.partial, follow_symlinks=False)
        linked = os.lstat(place.partial)
        if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):
            return want
        place.partial.unlink(missing_ok=True)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            return None
    digest = hashlib.sha256()
    try:
        # A new file (unlinked above), never one a link planted under the partial name points at.
        new = os.open(place.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with source.open("rb") as src, os.fdopen(new, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError:
        place.partial.unlink(missing_ok=True)
        return None
    if digest.hexdigest() != want or place.partial.stat().st_size != item.size:
        place.partial.unlink(missing_ok=True)
        return None
    return want
