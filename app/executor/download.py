"""One file's bytes: where it may go on disk, where it comes from, and the download into a
partial file next to its destination (app/executor/transfer.py moves the bytes). The declared size
is a promise: the download stops at one byte more, never writes past it, and fails on fewer.

The partial file is named after the file id, so a later attempt on the same storage finds it:
it is kept only when its prefix hashes to the checkpoint the server returned with the claim, and
the download continues after that prefix. An exclusive flock keeps two holders of one file (an
expired lease and its successor in another process) from writing it at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.executor.anchored import remove, unlink_if_there
from app.executor.client import Claimed
from app.executor.curl_lane import CurlLane
from app.executor.curl_outcomes import TransferError
from app.executor.lane_transfer import LaneTransfer
from app.executor.layout import NoCommit, Placement, Unreachable, UnsafePath, etag_name, placement
from app.executor.settings import CONNECTIONS_PER_FILE
from app.executor.stored_copy import from_stored_copy
from app.executor.transfer import (
    INLINE_BELOW,
    Cancelled,
    ConnectionPool,
    RangeIgnored,
    Transfer,
    Upstream,
    WrongSize,
    hash_prefix,
)

__all__ = [
    "Busy",
    "Cancelled",
    "Downloaded",
    "NoCommit",
    "NotPublished",
    "TransferError",
    "Unreachable",
    "UnsafePath",
    "Upstream",
    "WrongSize",
    "download",
    "mismatch",
]


class Busy(Exception):
    """Another process holds this file's partial download (an expired lease still running)."""


class NotPublished(Exception):
    """The downloaded bytes were not put in place: not the claimed file (final) or the
    publication failed (retryable)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Downloaded:
    """A finished download, not yet in place: `place.partial` is published once verified."""

    place: Placement
    sha256: str
    size: int
    copied_from: str | None = None  # placed from this stored copy (no byte downloaded)
    etag: str | None = None  # the hub's ETag as the download's first answer gave it (hf-cache)


def destination(storage: Sequence[Path] | Path, item: Claimed) -> Path:
    """Where the file's bytes go (tree layouts: the file itself; hf-cache: the blobs directory)."""
    return placement(storage, item).final


def file_url(endpoint: str, item: Claimed) -> str:
    """The hub's resolve URL of the file at the task's commit (datasets live under /datasets/)."""
    kind = "datasets/" if item.repo_type == "dataset" else ""
    ref = quote(item.ref, safe="")
    return f"{endpoint.rstrip('/')}/{kind}{item.repo_id}/resolve/{ref}/{quote(item.path, safe='/')}"


def partial_path(storage: Sequence[Path] | Path, item: Claimed) -> Path:
    return placement(storage, item).partial


@dataclass(frozen=True)
class Tuning:
    """How one executor moves bytes: connections per large file and in all (a shared cap), and
    the lane that fetches small files (None: they are fetched in a worker thread like the rest)."""

    connections_per_file: int = CONNECTIONS_PER_FILE
    slots: threading.BoundedSemaphore | None = None
    timeout: float = 60.0
    pool: ConnectionPool = field(default_factory=ConnectionPool)
    lane: CurlLane | None = None


def _resume_point(fd: int, item: Claimed) -> tuple[int, Any]:
    """(offset, sha256 state) to continue from: the server's checkpoint when this partial file
    holds exactly that prefix, else (0, empty) and the partial file is emptied."""
    have = os.fstat(fd).st_size
    if item.resume_bytes and item.resume_sha256 and have >= item.resume_bytes:
        digest = hash_prefix(fd, item.resume_bytes)
        if digest.hexdigest() == item.resume_sha256:
            os.ftruncate(fd, item.resume_bytes)  # bytes after the checkpoint were never verified
            return item.resume_bytes, digest
    os.ftruncate(fd, 0)
    return 0, hash_prefix(fd, 0)


def open_partial(place: Placement) -> int:
    """The partial file, opened and locked (Busy when another process holds it), in its directory
    as reached from the target's base (app/executor/anchored.py: made when missing, never through
    a link). It is truncated or written next, so it must be this file's own: a symbolic link
    under its name is never followed (O_NOFOLLOW), and a link or a file with another name (a
    hard link: a stored copy it was once linked from, or one planted in a tenant-writable
    directory) is removed and the partial made anew, its resume point lost."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    path = place.partial
    with place.made_directory(path.parent) as there:
        for _ in range(3):
            try:
                fd = os.open(path.name, flags, 0o644, dir_fd=there)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                unlink_if_there(path.name, there)  # a symbolic link under our name: the link goes, nothing else
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Busy(f"{path.name} is being written by another process") from exc
                raise
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                return fd
            os.close(fd)
            unlink_if_there(path.name, there)  # only this name: the other names keep their bytes
    raise OSError(errno.EEXIST, "the partial file was replaced again and again", str(path))


def remove_partial(place: Placement) -> None:
    """The partial file removed (missing is fine), in its anchored directory."""
    remove(place.base, place.partial)


async def download(
    storage: Sequence[Path],
    endpoint: str,
    item: Claimed,
    headers: dict[str, str],
    tuning: Tuning,
    on_bytes: Callable[[int], None],
    then: Callable[[Downloaded], None] | None = None,
) -> Downloaded:
    """Fetch the file into its partial file, resuming from the claim's checkpoint when the partial
    file matches it, then run `then` on the result (the caller's verification and publication).
    While it runs, item.transfer gives heartbeats their checkpoint. The partial file is kept on a
    transfer error or cancellation (a later attempt may resume it) and removed when the bytes are
    not the declared file (WrongSize). One worker thread does all of it, so a small file costs one
    hop off the event loop. A small file without a resume point goes through the lane instead
    (app/executor/curl_lane.py), its partial file opened and published there."""
    headers = with_hub_token(headers, item)
    if lane_takes(tuning, item):
        assert tuning.lane is not None
        return await _in_lane(tuning.lane, lane_transfer(storage, endpoint, item, headers, on_bytes, then))
    cancel = threading.Event()

    def work() -> Downloaded:
        result = _fetch_blocking(storage, endpoint, item, headers, tuning, on_bytes, cancel)
        if then is not None:
            then(result)
        return result

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        cancel.set()  # the threads stop at their next read; wait so the partial file is closed
        await asyncio.gather(worker, return_exceptions=True)
        raise
    finally:
        item.transfer = None


def in_lane(item: Claimed) -> bool:
    """Whether the lane is for this file: small, nothing to resume, no stored copy to place."""
    return item.size < INLINE_BELOW and not item.resume_bytes and item.stored_path is None


def lane_takes(tuning: Tuning, item: Claimed) -> bool:
    """Whether download() sends this file through the lane (there is one, and it runs)."""
    return tuning.lane is not None and tuning.lane.usable and in_lane(item)


async def _in_lane(lane: CurlLane, transfer: LaneTransfer[Downloaded]) -> Downloaded:
    waiting = lane.submit(transfer)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        lane.cancel(transfer)  # the lane stops it and closes the partial file; wait for that
        await asyncio.gather(waiting, return_exceptions=True)
        raise


def lane_transfer(
    storage: Sequence[Path],
    endpoint: str,
    item: Claimed,
    headers: dict[str, str],
    on_bytes: Callable[[int], None],
    then: Callable[[Downloaded], None] | None,
) -> LaneTransfer[Downloaded]:
    """The file as the lane fetches it: its partial file opened (and emptied: no resume point)
    and placed in the lane's thread, `then` (verification and publication) run there on the
    result. headers: the executor's, the claim's hub token already in them (download())."""
    place: list[Placement] = []

    def start() -> tuple[int, Callable[[], None]]:
        here = placement(storage, item)
        fd = open_partial(here)
        try:
            os.ftruncate(fd, 0)  # no resume point: whatever an earlier attempt left is not kept
        except OSError:
            os.close(fd)
            raise
        place.append(here)
        return fd, functools.partial(remove_partial, here)

    def finish(sha256: str, etag: str | None) -> Downloaded:
        result = Downloaded(place[0], sha256, item.size, etag=etag_name(etag))
        if then is not None:
            then(result)
        return result

    item.resumed_from = item.bytes_done = 0
    return LaneTransfer(
        url=file_url(endpoint, item),
        headers=[f"{name}: {value}" for name, value in headers.items()],
        size=item.size,
        start=start,
        finish=finish,
        on_bytes=on_bytes,
        want_etag=item.storage_layout == "hf-cache",
    )


def with_hub_token(headers: dict[str, str], item: Claimed) -> dict[str, str]:
    """The request headers for this file: the tenant's token (from its claim) overrides the
    executor's own."""
    return {**headers, "Authorization": f"Bearer {item.hub_token}"} if item.hub_token else headers


def _fetch_blocking(
    storage: Sequence[Path],
    endpoint: str,
    item: Claimed,
    headers: dict[str, str],
    tuning: Tuning,
    on_bytes: Callable[[int], None],
    cancel: threading.Event,
) -> Downloaded:
    place = placement(storage, item)
    copied = from_stored_copy(place, item)
    if copied is not None:
        return Downloaded(place, copied, item.size, copied_from=item.stored_path)
    fd = open_partial(place)
    try:
        start, digest = _resume_point(fd, item)

        answers: list[dict[str, str]] = []
        transfers: list[Transfer] = []

        def fetch(start: int, digest: Any, connections: int) -> str:
            item.resumed_from = item.bytes_done = start
            transfer = Transfer(
                url=file_url(endpoint, item),
                headers=headers,
                fd=fd,
                size=item.size,
                resume_at=start,
                digest=digest,
                connections=connections,
                slots=tuning.slots,
                timeout=tuning.timeout,
                on_bytes=on_bytes,
                cancel=cancel,
                pool=tuning.pool,
            )
            item.transfer = transfer
            transfers.append(transfer)
            answers.append(transfer.first_answer)
            return transfer.run()

        try:
            sha256 = fetch(start, digest, tuning.connections_per_file)
        except RangeIgnored:
            # No ranges there: the whole file in one stream, from the beginning (the first
            # transfer's checkpoints named bytes the truncation removes).
            transfers[-1].close_fd()
            os.ftruncate(fd, 0)
            sha256 = fetch(0, hash_prefix(fd, 0), 1)
    except Cancelled:
        # A stop (or a lost lease): the release reports what is on disk now, synced, rather
        # than the last heartbeat's checkpoint, up to one interval older.
        if transfers:
            with contextlib.suppress(OSError):
                item.stopped_at = transfers[-1].checkpoint()
        raise
    except WrongSize:
        remove_partial(place)
        raise
    finally:
        for transfer in transfers:
            transfer.close_fd()
        os.close(fd)
    return Downloaded(place, sha256, item.size, etag=etag_name(answers[-1].get("etag")) if answers else None)


def discard(storage: Sequence[Path], item: Claimed) -> None:
    """Remove the file's partial download (its lease is gone, or its bytes are not the file)."""
    try:
        remove_partial(placement(storage, item))
    except (UnsafePath, Unreachable, NoCommit):
        pass


def mismatch(item: Claimed, result: Downloaded) -> str | None:
    """Why the bytes are not the file the claim described, or None. The size is always checked
    (download already refuses any other; this holds whatever produced the result), then the
    sha256 when the task gave one."""
    if result.size != item.size:
        return f"size mismatch: expected {item.size} bytes, got {result.size}"
    if item.sha256 and result.sha256 != item.sha256.lower():
        return f"sha256 mismatch: expected {item.sha256}, got {result.sha256}"
    return None
