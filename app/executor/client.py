"""The executor API as the reference executor uses it: claims, and per-file reports with
their retry policy."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("dlw.executor")

# A report is tried at least this often: transport errors and 503s are worth a retry, refusals
# are not.
REPORT_ATTEMPTS = 3


def retry_after(response: httpx.Response) -> float:
    """The pause a 503 asks for (Retry-After seconds), between 0.2 and 2 s (1 s when absent)."""
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.2), 2.0)
    except ValueError:
        return 1.0


class LeaseLost(Exception):
    """The server no longer recognises our lease: stop working on the file."""


class TokenRefused(Exception):
    """The API refuses our token (401/403): it will not get better by retrying."""


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
    resume_bytes: int = 0
    resume_sha256: str | None = None
    bytes_done: int = 0
    resumed_from: int = 0  # where this attempt's download started (the verified checkpoint)
    transfer: Any = None  # the running app.executor.transfer.Transfer, for checkpoints
    stopped_at: tuple[int, str] | None = None  # the synced checkpoint of a download a stop cancelled
    repo_type: str = "model"
    commit: str | None = None  # what to download; None (an unresolved task): the revision
    hub_token: str | None = field(default=None, repr=False)  # the tenant's, for this file only
    storage_root: str | None = None  # the task's target root; None: the executor's default storage
    storage_layout: str = "tree"  # or "hf-cache" (app/executor/layout.py)
    stored_path: str | None = None  # a verified copy of this content in the target: link it, do not download

    @property
    def ref(self) -> str:
        """The revision to download: the resolved commit, so a branch moving changes nothing."""
        return self.commit or self.revision

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
            resume_bytes=int(item.get("resume_bytes") or 0),
            resume_sha256=item.get("resume_sha256"),
            repo_type=str(item.get("repo_type") or "model"),
            commit=item.get("commit"),
            hub_token=item.get("hub_token"),
            storage_root=item.get("storage_root"),
            storage_layout=str(item.get("storage_layout") or "tree"),
            stored_path=item.get("stored_path"),
        )


class ExecutorApi:
    """Calls of the executor routes over one httpx client (base URL and bearer token set)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def claim(self, max_files: int, lease_seconds: int, label: str, wait: int = 0) -> list[Claimed]:
        """Files claimed; with `wait` (seconds), the API waits that long for work when there is none yet."""
        body: dict[str, Any] = {"max_files": max_files, "lease_seconds": lease_seconds, "executor": label}
        if wait > 0:
            body["wait_seconds"] = wait
        response = await self.http.post("/api/v1/executor/claim", json=body, timeout=30 + wait)
        if response.status_code in (401, 403):
            raise TokenRefused(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 200:
            raise ValueError(f"claim answered {response.status_code}: {response.text[:200]}")
        return [Claimed.from_api(item) for item in response.json()["files"]]

    async def claim_deletions(self, max_deletions: int, lease_seconds: int, label: str) -> list[dict[str, Any]]:
        """Task deletions to carry out (docs/storage.md, "Deleting"), as the claim returned them."""
        response = await self.http.post(
            "/api/v1/executor/deletions/claim",
            json={"max_deletions": max_deletions, "lease_seconds": lease_seconds, "executor": label},
        )
        if response.status_code in (401, 403):
            raise TokenRefused(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 200:
            raise ValueError(f"deletion claim answered {response.status_code}: {response.text[:200]}")
        return list(response.json()["deletions"])

    async def report_deletion(self, deletion_id: str, token: str, action: str, body: dict[str, Any]) -> str:
        """POST complete/fail for a deletion; the outcome, or the code it was refused with.
        Transport errors and 503s are tried again (REPORT_ATTEMPTS), refusals are not."""
        for attempt in range(REPORT_ATTEMPTS):
            try:
                response = await self.http.post(
                    f"/api/v1/executor/deletions/{deletion_id}/{action}", json={"assignment_token": token, **body}
                )
            except httpx.HTTPError as exc:
                if attempt == REPORT_ATTEMPTS - 1:
                    log.warning("deletion %s: %s not reported: %s", deletion_id, action, exc)
                    return "UNREPORTED"
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code == 200:
                return str(response.json().get("outcome", "ok"))
            if response.status_code == 503 and attempt < REPORT_ATTEMPTS - 1:
                await asyncio.sleep(retry_after(response))
                continue
            code = str(response.json().get("detail", {}).get("code", response.status_code))
            log.warning("deletion %s: %s refused: %s", deletion_id, action, code)
            return code
        return "UNREPORTED"

    async def report(self, item: Claimed, action: str, body: dict[str, Any], *, raise_lost: bool = False) -> str:
        """POST an action for the file; returns the outcome, or the error code it was refused with.

        With raise_lost (heartbeats) a lost lease raises LeaseLost and any other failure raises,
        so the caller decides; otherwise failures are logged and returned as a code."""
        payload = {"assignment_token": item.token, **body}
        # A completion not heard is a file downloaded again once its lease expires: outside
        # heartbeats, keep trying through a database failover (503s, ~30 s) for up to half the
        # lease (at least 2/3 of it is left after the last heartbeat), then give up.
        keep_trying_until = time.monotonic() + (0 if raise_lost else item.lease_seconds / 2)
        for attempt in itertools.count():
            last = attempt >= REPORT_ATTEMPTS - 1 and time.monotonic() >= keep_trying_until
            try:
                response = await self.http.post(f"/api/v1/executor/files/{item.id}/{action}", json=payload)
            except httpx.HTTPError as exc:
                if raise_lost:
                    raise
                if last:
                    log.warning("%s: %s not reported: %s", item.path, action, exc)
                    return "UNREPORTED"
                await asyncio.sleep(min(0.5 * (attempt + 1), 2))
                continue
            if response.status_code == 200:
                return str(response.json().get("outcome", "ok"))
            code = str(response.json().get("detail", {}).get("code", response.status_code))
            if response.status_code == 503 and not last:
                await asyncio.sleep(retry_after(response))
                continue
            if code in ("LEASE_LOST", "FILE_NOT_FOUND") and raise_lost:
                raise LeaseLost(item.id)
            if action != "heartbeat":
                log.warning("%s: %s refused: %s", item.path, action, code)
            if raise_lost:
                raise ValueError(f"{action} answered {response.status_code} {code}")
            return code
        raise AssertionError("unreachable")  # the last attempt returns or raises
