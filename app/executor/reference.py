"""The reference executor: `dlw executor run`.

It claims files from the executor API, downloads each from a Hugging Face-compatible file
endpoint ({endpoint}/{repo_id}/resolve/{revision}/{path}), streams it through a temporary file
next to its destination <storage>/<tenant>/<repo_id>/<revision>/<path>, verifies sha256 (and
the size), moves it into place with os.replace, and only then reports it complete. While a
download runs it heartbeats every lease/3 seconds; a 409 LEASE_LOST (the task was cancelled, or
the lease expired) aborts it and discards the partial file.

SIGTERM or SIGINT: stop claiming, abort the downloads in flight, give their files back to the
queue at once (release: no attempt is used up) and exit 0. A killed executor gives nothing
back: its leases expire and the files are claimed again.

Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when the API refuses the
token (401/403: expired, wrong secret, or not an executor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from app.config import Settings

log = logging.getLogger("dlw.executor")

CHUNK = 1 << 20


class LeaseLost(Exception):
    """The server no longer recognises our lease: stop working on the file."""


class TokenRefused(Exception):
    """The API refuses our token (401/403): it will not get better by retrying."""


class UnsafePath(ValueError):
    """A file whose destination would leave the storage directory."""


class Upstream(Exception):
    """The file endpoint answered with an error status."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


@dataclass(frozen=True)
class Config:
    base_url: str
    token: str
    storage: Path
    hf_endpoint: str
    hf_token: str | None = None
    concurrency: int = 2
    lease_seconds: int = 60
    poll_seconds: float = 2.0
    label: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


@dataclass
class Claimed:
    """One file we hold a lease on, as the claim returned it."""

    id: str
    tenant: str
    repo_id: str
    revision: str
    path: str
    size: int
    sha256: str | None
    token: str
    lease_seconds: int
    bytes_done: int = 0

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> Claimed:
        return cls(
            id=str(item["id"]),
            tenant=str(item["tenant"]),
            repo_id=str(item["repo_id"]),
            revision=str(item["revision"]),
            path=str(item["path"]),
            size=int(item["size"]),
            sha256=item.get("sha256"),
            token=str(item["assignment_token"]),
            lease_seconds=int(item["lease_seconds"]),
        )


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
    return f"{endpoint.rstrip('/')}/{item.repo_id}/resolve/{quote(item.revision, safe='')}/{quote(item.path, safe='/')}"


def _flush_and_sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


class Progress:
    """One status line on a terminal: files in flight, bytes, rate. Silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self._last = 0.0
        self._started = time.monotonic()
        self._bytes = 0

    def add_bytes(self, n: int) -> None:
        self._bytes += n

    def draw(self, active: list[Claimed], *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        total = sum(a.size for a in active)
        done = sum(a.bytes_done for a in active)
        width = 24
        filled = int(width * done / total) if total else 0
        rate = self._bytes / max(now - self._started, 1e-6) / 1e6
        bar = "#" * filled + "." * (width - filled)
        pct = f"{100 * done / total:5.1f}%" if total else "  --  "
        line = (
            f"[{bar}] {pct} {done / 1e6:8.1f}/{total / 1e6:.1f} MB  {len(active)} active"
            f"  {self.done} done  {self.failed} failed  {rate:6.1f} MB/s"
        )
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class _ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines clear the progress line first, so the two never share a line."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(sys.stderr)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.clear()
        super().emit(record)


class ReferenceExecutor:
    def __init__(self, config: Config, *, progress: bool | None = None) -> None:
        self.config = config
        self.progress = Progress(sys.stderr.isatty() if progress is None else progress)
        self.stopping = asyncio.Event()
        self.active: dict[str, tuple[Claimed, asyncio.Task[None]]] = {}
        self._api: httpx.AsyncClient | None = None
        self._hub: httpx.AsyncClient | None = None
        self.exit_code = 0

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: no more claims; giving back %d file(s) in flight", len(self.active))
            self.stopping.set()

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        headers = {"Authorization": f"Bearer {self.config.token}", "User-Agent": "dlw-reference-executor"}
        hub_headers = {"User-Agent": "dlw-reference-executor"}
        if self.config.hf_token:
            hub_headers["Authorization"] = f"Bearer {self.config.hf_token}"  # httpx drops it on cross-origin redirects
        self.config.storage.mkdir(parents=True, exist_ok=True)
        async with (
            httpx.AsyncClient(base_url=self.config.base_url, headers=headers, timeout=30, trust_env=False) as api,
            httpx.AsyncClient(headers=hub_headers, follow_redirects=True, timeout=httpx.Timeout(60, connect=10)) as hub,
        ):
            self._api, self._hub = api, hub
            log.info(
                "executor %s: claiming from %s, files from %s, into %s",
                self.config.label,
                self.config.base_url,
                self.config.hf_endpoint,
                self.config.storage,
            )
            try:
                await self._loop()
            finally:
                await self._shutdown()
                self.progress.clear()
        return self.exit_code

    async def _loop(self) -> None:
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                claimed = 0
                free = self.config.concurrency - len(self.active)
                if free > 0:
                    try:
                        claimed = await self._claim(free)
                    except TokenRefused as exc:
                        log.error("the API refuses this executor's token (%s): mint a new one; stopping", exc)
                        self.exit_code = 3
                        self.stop()
                        break
                    except (httpx.HTTPError, ValueError) as exc:
                        log.warning("claim failed: %s", exc)
                # Wait for a free slot, a stop, or (when the queue was empty) the poll interval.
                waiting: set[asyncio.Future[Any]] = {stop_wait, *(task for _, task in self.active.values())}
                timeout = 0 if claimed and len(self.active) < self.config.concurrency else self.config.poll_seconds
                if timeout:
                    await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                self.progress.draw([c for c, _ in self.active.values()])
        finally:
            stop_wait.cancel()

    async def _claim(self, free: int) -> int:
        assert self._api is not None
        response = await self._api.post(
            "/api/v1/executor/claim",
            json={"max_files": free, "lease_seconds": self.config.lease_seconds, "executor": self.config.label},
        )
        if response.status_code in (401, 403):
            raise TokenRefused(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 200:
            raise ValueError(f"claim answered {response.status_code}: {response.text[:200]}")
        for item in response.json()["files"]:
            claimed = Claimed.from_api(item)
            task = asyncio.create_task(self._work(claimed), name=f"download {claimed.id}")
            self.active[claimed.id] = (claimed, task)
            task.add_done_callback(functools.partial(self._forget, claimed.id))
        return len(response.json()["files"])

    def _forget(self, file_id: str, _task: asyncio.Task[None]) -> None:
        self.active.pop(file_id, None)

    async def _shutdown(self) -> None:
        tasks = [task for _, task in self.active.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one file --------------------------------------------------------------------------
    async def _work(self, item: Claimed) -> None:
        download = asyncio.create_task(self._download(item))
        lost = asyncio.Event()
        beats = asyncio.create_task(self._heartbeats(item, download, lost))
        try:
            target, tmp, sha, size = await download
        except asyncio.CancelledError:
            if lost.is_set():  # our own heartbeat stopped it: the lease is gone, report nothing
                log.warning("%s: lease lost (task cancelled or lease expired); partial file discarded", item.path)
                return
            await self._report(item, "release", {})  # shutting down: back to the queue at once
            raise
        except UnsafePath as exc:
            await self._fail(item, str(exc), retryable=False)
            return
        except Upstream as exc:
            await self._fail(item, str(exc), retryable=exc.status >= 500 or exc.status == 429)
            return
        except (httpx.HTTPError, OSError) as exc:
            await self._fail(item, f"{type(exc).__name__}: {exc}", retryable=True)
            return
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        if item.sha256 and sha != item.sha256.lower():
            tmp.unlink(missing_ok=True)
            await self._fail(item, f"sha256 mismatch: expected {item.sha256}, got {sha}", retryable=False)
            return
        if not item.sha256 and size != item.size:
            tmp.unlink(missing_ok=True)
            await self._fail(item, f"size mismatch: expected {item.size} bytes, got {size}", retryable=False)
            return
        os.replace(tmp, target)  # on disk before the server hears "succeeded"
        outcome = await self._report(item, "complete", {"bytes": size, "sha256": sha})
        if outcome in ("completed", "already_completed"):
            self.progress.done += 1
            log.info("%s/%s@%s:%s done (%d bytes)", item.tenant, item.repo_id, item.revision, item.path, size)

    async def _download(self, item: Claimed) -> tuple[Path, Path, str, int]:
        assert self._hub is not None
        target = destination(self.config.storage, item)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{item.token}.part"
        digest = hashlib.sha256()
        url = file_url(self.config.hf_endpoint, item)
        try:
            async with self._hub.stream("GET", url) as response:
                if response.status_code != 200:
                    raise Upstream(response.status_code, url)
                out = await asyncio.to_thread(open, tmp, "wb")
                try:
                    async for chunk in response.aiter_bytes(CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                        digest.update(chunk)
                        item.bytes_done += len(chunk)
                        self.progress.add_bytes(len(chunk))
                        self.progress.draw([c for c, _ in self.active.values()])
                    await asyncio.to_thread(_flush_and_sync, out)
                finally:
                    out.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target, tmp, digest.hexdigest(), item.bytes_done

    async def _heartbeats(self, item: Claimed, download: asyncio.Task[Any], lost: asyncio.Event) -> None:
        interval = max(item.lease_seconds / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._report(item, "heartbeat", {"bytes_done": item.bytes_done}, raise_lost=True)
            except LeaseLost:
                lost.set()
                download.cancel()
                return
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("%s: heartbeat failed (%s); retrying", item.path, exc)

    async def _fail(self, item: Claimed, error: str, *, retryable: bool) -> None:
        self.progress.failed += 1
        log.warning("%s: %s (%s)", item.path, error, "retryable" if retryable else "final")
        await self._report(item, "fail", {"error": error[:2000], "retryable": retryable})

    async def _report(self, item: Claimed, action: str, body: dict[str, Any], *, raise_lost: bool = False) -> str:
        """POST an action for the file; returns the outcome, or the error code it was refused with."""
        assert self._api is not None
        payload = {"assignment_token": item.token, **body}
        for attempt in range(3):
            try:
                response = await self._api.post(f"/api/v1/executor/files/{item.id}/{action}", json=payload)
            except httpx.HTTPError as exc:
                if raise_lost or attempt == 2:
                    if raise_lost:
                        raise
                    log.warning("%s: %s not reported: %s", item.path, action, exc)
                    return "UNREPORTED"
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code == 200:
                return str(response.json().get("outcome", "ok"))
            code = str(response.json().get("detail", {}).get("code", response.status_code))
            if response.status_code == 503 and attempt < 2:
                await asyncio.sleep(1)
                continue
            if code in ("LEASE_LOST", "FILE_NOT_FOUND") and raise_lost:
                raise LeaseLost(item.id)
            if action != "heartbeat":
                log.warning("%s: %s refused: %s", item.path, action, code)
            if raise_lost:
                raise ValueError(f"{action} answered {response.status_code} {code}")
            return code
        return "UNREPORTED"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="the DLW API (default: DLW_EXECUTOR_BASE_URL)")
    parser.add_argument("--token", help="executor token (default: DLW_EXECUTOR_TOKEN; prefer the variable)")
    parser.add_argument("--storage", help="download root directory (default: DLW_EXECUTOR_STORAGE)")
    parser.add_argument("--hf-endpoint", help="Hugging Face-compatible file endpoint (default: DLW_HF_ENDPOINT)")
    parser.add_argument("--concurrency", type=int, default=2, help="files downloaded at once (default 2)")
    parser.add_argument("--lease-seconds", type=int, default=60, help="lease asked for each file (default 60)")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="wait when the queue is empty (default 2)")
    parser.add_argument("--label", help="instance label recorded with each lease (default: host-pid)")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    token = args.token or settings.executor_token
    storage = args.storage or settings.executor_storage
    problems = []
    if not token:
        problems.append("no executor token: pass --token or set DLW_EXECUTOR_TOKEN")
    if not storage:
        problems.append("no storage directory: pass --storage or set DLW_EXECUTOR_STORAGE")
    if args.concurrency < 1 or not 5 <= args.lease_seconds <= 3600 or args.poll_seconds <= 0:
        problems.append("--concurrency must be >= 1, --lease-seconds 5..3600, --poll-seconds > 0")
    if problems:
        for line in problems:
            print(f"dlw executor: {line}", file=sys.stderr)
        return 2
    assert token and storage
    config = Config(
        base_url=args.base_url or settings.executor_base_url,
        token=token,
        storage=Path(storage),
        hf_endpoint=args.hf_endpoint or settings.hf_endpoint,
        hf_token=settings.hf_token,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        poll_seconds=args.poll_seconds,
        **({"label": args.label} if args.label else {}),
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll is noise
    executor = ReferenceExecutor(config)
    if executor.progress.enabled:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = _ProgressAwareHandler(executor.progress)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    return asyncio.run(executor.run())
