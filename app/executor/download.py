"""One file's bytes: where it may go on disk, where it comes from, and the streamed download
through a temporary file whose sha256 and size are computed on the way. The declared size is a
promise: the download stops at one byte more, never writes past it, and fails on fewer."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import httpx

from app.executor.client import Claimed


class UnsafePath(ValueError):
    """A file whose destination would leave the storage directory."""


class WrongSize(ValueError):
    """The file endpoint sends (or announces) more or fewer bytes than the file's declared size:
    not the declared file, so a final failure, never a download."""


class Upstream(Exception):
    """The file endpoint answered with an error status."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


@dataclass(frozen=True)
class Downloaded:
    """A finished download, not yet in place: `tmp` becomes `target` once verified."""

    target: Path
    tmp: Path
    sha256: str
    size: int


def destination(storage: Path, item: Claimed) -> Path:
    """<storage>/<tenant>/<repo_id>/<revision>/<path>, refusing anything that would escape it.
    The server validated these names; this does not rely on it."""
    parts = [item.tenant, *item.repo_id.split("/"), *item.revision.split("/"), *item.path.split("/")]
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\x00" in part or part.startswith("~"):
            raise UnsafePath(f"unsafe path segment {part!r} in {item.repo_id}@{item.revision}:{item.path}")
    root = storage.resolve()
    target = root.joinpath(*parts).resolve()
    if not target.is_relative_to(root) or target == root:
        raise UnsafePath(f"{item.path!r} resolves outside the storage directory")
    return target


def file_url(endpoint: str, item: Claimed) -> str:
    """The hub's resolve URL of the file at the task's commit (datasets live under /datasets/)."""
    kind = "datasets/" if item.repo_type == "dataset" else ""
    ref = quote(item.ref, safe="")
    return f"{endpoint.rstrip('/')}/{kind}{item.repo_id}/resolve/{ref}/{quote(item.path, safe='/')}"


def _announced_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _too_many(size: int, detail: str = "") -> WrongSize:
    return WrongSize(f"server sent more than the declared {size} bytes{detail}")


def _too_few(size: int, got: int, detail: str = "") -> WrongSize:
    return WrongSize(f"server sent fewer than the declared {size} bytes ({got}{detail})")


def _flush_and_sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


async def download(
    hub: httpx.AsyncClient, storage: Path, endpoint: str, item: Claimed, on_bytes: Callable[[int], None]
) -> Downloaded:
    """Stream the file next to its destination, counting item.bytes_done; the partial file is
    removed on any failure or cancellation. At most item.size bytes are ever written: a
    Content-Length other than it, a chunk that would pass it, or a body that ends short of it
    raises WrongSize. The bytes are stored as sent (identity encoding asked for, nothing decoded),
    so what is counted is what came over the wire and no compressed body can expand on disk."""
    target = destination(storage, item)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lease token in the name keeps two holders of the same file (an expired lease and its
    # successor) from writing into one temporary file.
    tmp = target.parent / f".{target.name}.{item.token}.part"
    digest = hashlib.sha256()
    url = file_url(endpoint, item)
    try:
        headers = {"Accept-Encoding": "identity"}
        if item.hub_token:  # the tenant's token overrides the executor's own (httpx drops it off-origin)
            headers["Authorization"] = f"Bearer {item.hub_token}"
        async with hub.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise Upstream(response.status_code, url)
            announced = _announced_length(response)
            if announced is not None and announced > item.size:
                raise _too_many(item.size, f" (Content-Length {announced})")
            if announced is not None and announced < item.size:
                raise _too_few(item.size, announced, " announced by Content-Length")
            out = await asyncio.to_thread(open, tmp, "wb")
            try:
                # As the transport reads (at most one read past the declared size is received).
                async for chunk in response.aiter_raw():
                    if item.bytes_done + len(chunk) > item.size:
                        raise _too_many(item.size)
                    await asyncio.to_thread(out.write, chunk)
                    digest.update(chunk)
                    item.bytes_done += len(chunk)
                    on_bytes(len(chunk))
                if item.bytes_done < item.size:
                    raise _too_few(item.size, item.bytes_done)
                await asyncio.to_thread(_flush_and_sync, out)
            finally:
                out.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Downloaded(target, tmp, digest.hexdigest(), item.bytes_done)


def mismatch(item: Claimed, result: Downloaded) -> str | None:
    """Why the bytes are not the file the claim described, or None. The size is always checked
    (download already refuses any other; this holds whatever produced the result), then the
    sha256 when the task gave one."""
    if result.size != item.size:
        return f"size mismatch: expected {item.size} bytes, got {result.size}"
    if item.sha256 and result.sha256 != item.sha256.lower():
        return f"sha256 mismatch: expected {item.sha256}, got {result.sha256}"
    return None
