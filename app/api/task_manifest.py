"""A new task's manifest, settled before admission: resolved on the hub from the repository name
(revision → commit, include/exclude → files with exact sizes and sha256), or the client's list
checked against the hub. Runs outside any database transaction: the tenant's hub token is read
in a short transaction of its own first, and the whole conversation with the hub is bounded by
DLW_HUB_TIMEOUT_SECONDS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request

from app.api import hub_secrets
from app.api.errors import ApiError
from app.api.hub import COMMIT, HubClient, HubFile, select, unavailable
from app.api.refusals import EMPTY_SELECTION, FILES_REQUIRED, HUB_UNAVAILABLE, MANIFEST_MISMATCH, MANIFEST_TOO_LARGE
from app.api.transaction import request_transaction
from app.config import Settings
from app.db.queries import SQL
from app.identity.principal import Principal

log = logging.getLogger("dlw.api.hub")

# A task resolved from the hub may hold more files than a client may list in one body.
MAX_RESOLVED_FILES = 100_000


@dataclass(frozen=True)
class Wanted:
    """What the client asked for (the parts of TaskCreate the hub answers)."""

    repo_type: str
    repo_id: str
    revision: str
    include: Sequence[str] | None
    exclude: Sequence[str] | None
    files: Sequence[dict[str, Any]] | None  # {path, size, sha256?} as the client listed them


@dataclass(frozen=True)
class Manifest:
    commit: str | None  # None: the hub could not be asked, the client's list is taken as is
    files: list[dict[str, Any]]


async def tenant_hub_token(request: Request, principal: Principal) -> str | None:
    """The tenant's hub token in the clear, or None (none set, or it no longer decrypts)."""
    async with request_transaction(request, principal) as conn:
        sealed = await conn.fetchval(SQL["hub_token_ciphertext"])
    settings: Settings = request.app.state.settings
    return hub_secrets.opened(settings.secret_key, settings.auth_dev_mode, principal.tenant_id, sealed)


async def settle(request: Request, principal: Principal, wanted: Wanted) -> Manifest:
    settings: Settings = request.app.state.settings
    if not settings.hf_endpoint:  # no hub configured: client manifests only, unchecked
        if wanted.files is None:  # not an outage: nothing to retry
            raise FILES_REQUIRED.error()
        return Manifest(_commit_in(wanted.revision), list(wanted.files))
    token = await tenant_hub_token(request, principal)
    headers = {"User-Agent": "dlw-api", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        # httpx drops the Authorization header on a redirect to another origin.
        async with (
            asyncio.timeout(settings.hub_timeout_seconds),
            httpx.AsyncClient(
                headers=headers,
                timeout=settings.hub_request_timeout_seconds,
                follow_redirects=True,
                trust_env=False,
            ) as http,
        ):
            return await _resolve(HubClient(http, settings.hf_endpoint, wanted.repo_type, wanted.repo_id), wanted)
    except TimeoutError as exc:
        error: ApiError = unavailable(None, f"no complete answer within {settings.hub_timeout_seconds} s")
        if wanted.files is None:
            raise error from exc
    except ApiError as exc:
        if wanted.files is None or not isinstance(exc.detail, dict) or exc.detail.get("code") != HUB_UNAVAILABLE.code:
            raise
    # The hub cannot be asked now: a client's own list is admitted as given (documented).
    assert wanted.files is not None
    return Manifest(_commit_in(wanted.revision), list(wanted.files))


def _commit_in(revision: str) -> str | None:
    """A revision that is a full commit sha is its own resolution."""
    lowered = revision.lower()
    return lowered if COMMIT.fullmatch(lowered) else None


async def _resolve(hub: HubClient, wanted: Wanted) -> Manifest:
    revision = await hub.revision(wanted.revision)
    by_path = {f.path: f for f in revision.files}
    if wanted.files is not None:
        chosen = [_listed(by_path, spec) for spec in wanted.files]
    else:
        chosen = [by_path[p] for p in select(list(by_path), wanted.include, wanted.exclude)]
    if not chosen:
        raise EMPTY_SELECTION.error()
    if len(chosen) > MAX_RESOLVED_FILES:
        raise MANIFEST_TOO_LARGE.error()
    if revision.restricted:  # the listing of a gated repository is public, its files are not
        await hub.check_access(revision.commit, chosen[0].path)
    hashed = await hub.complete_hashes(revision.commit, chosen)
    if wanted.files is not None:
        for spec, item in zip(wanted.files, hashed, strict=True):
            if spec.get("sha256") and spec["sha256"] != item.sha256:
                raise _mismatch(item.path, "sha256")
    files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in hashed]
    return Manifest(revision.commit, files)


def _listed(by_path: dict[str, HubFile], spec: dict[str, Any]) -> HubFile:
    item = by_path.get(spec["path"])
    if item is None:
        raise _mismatch(spec["path"], "path")
    if item.size != spec["size"]:
        raise _mismatch(item.path, "size")
    return item


def _mismatch(path: str, what: str) -> ApiError:
    error = MANIFEST_MISMATCH.error()
    assert isinstance(error.detail, dict)
    error.detail.update(path=path, mismatch=what)
    return error
