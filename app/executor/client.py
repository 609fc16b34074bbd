"""The executor API as the reference executor uses it: claims, and per-file reports with
their retry policy."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("dlw.executor")

# A report is tried this often: transport errors and 503s are worth a retry, refusals are not.
REPORT_ATTEMPTS = 3


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
    bytes_done: int = 0
    repo_type: str = "model"
    commit: str | None = None  # what to download; None (an unresolved task): the revision
    hub_token: str | None = field(default=None, repr=False)  # the tenant's, for this file only

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
            repo_type=str(item.get("repo_type") or "model"),
            commit=item.get("commit"),
            hub_token=item.get("hub_token"),
        )


class ExecutorApi:
    """Calls of the executor routes over one httpx client (base URL and bearer token set)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def claim(self, max_files: int, lease_seconds: int, label: str) -> list[Claimed]:
        response = await self.http.post(
            "/api/v1/executor/claim",
            json={"max_files": max_files, "lease_seconds": lease_seconds, "executor": label},
        )
        if response.status_code in (401, 403):
            raise TokenRefused(f"{response.status_code} {response.text[:200]}")
        if response.status_code != 200:
            raise ValueError(f"claim answered {response.status_code}: {response.text[:200]}")
        return [Claimed.from_api(item) for item in response.json()["files"]]

    async def report(self, item: Claimed, action: str, body: dict[str, Any], *, raise_lost: bool = False) -> str:
        """POST an action for the file; returns the outcome, or the error code it was refused with.

        With raise_lost (heartbeats) a lost lease raises LeaseLost and any other failure raises,
        so the caller decides; otherwise failures are logged and returned as a code."""
        payload = {"assignment_token": item.token, **body}
        for attempt in range(REPORT_ATTEMPTS):
            last = attempt == REPORT_ATTEMPTS - 1
            try:
                response = await self.http.post(f"/api/v1/executor/files/{item.id}/{action}", json=payload)
            except httpx.HTTPError as exc:
                if raise_lost:
                    raise
                if last:
                    log.warning("%s: %s not reported: %s", item.path, action, exc)
                    return "UNREPORTED"
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code == 200:
                return str(response.json().get("outcome", "ok"))
            code = str(response.json().get("detail", {}).get("code", response.status_code))
            if response.status_code == 503 and not last:
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
