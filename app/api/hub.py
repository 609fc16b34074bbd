"""Asking the Hugging Face Hub (DLW_HF_ENDPOINT) what a revision is, before admission.

One resolution: GET /api/{type}s/{repo}/revision/{rev} (the commit, gated/private flags), then
the recursive tree of that commit, page by page (`Link: <...>; rel="next"`); each file's size
and, for LFS files, its sha256 (`lfs.oid`). Files stored in git carry only a git blob id, so
their sha256 is computed here from resolve/{commit}/{path} (small by the hub's rules; a bounded
number at once). A gated or private repository is checked with one HEAD of a selected file: its
listing is public, its files are not. The caller bounds the whole with a deadline; every hub
answer that is not a result becomes one of the refusals of app/api/refusals.py (never a 500,
never a hang). No database connection is held meanwhile: the lock-holding admission comes after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from app.api.errors import ApiError
from app.api.refusals import (
    HUB_ACCESS_DENIED,
    HUB_UNAVAILABLE,
    REPO_NOT_FOUND,
    REVISION_NOT_FOUND,
)

log = logging.getLogger("dlw.api.hub")

COMMIT = re.compile(r"[0-9a-f]{40}")  # fullmatch: "$" would also take a final newline
SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_CONCURRENCY = 8  # git-stored files hashed at once
MAX_LISTED = 1_000_000  # entries of a tree listing before we stop reading (a runaway hub)
RETRY_AFTER_MAX = 300


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # known for LFS files; computed later for git files
    lfs: bool


@dataclass(frozen=True)
class Revision:
    commit: str
    files: list[HubFile]
    restricted: bool  # gated or private: files need the token's access


def unavailable(retry_after: int | None = None, why: str = "") -> ApiError:
    if why:
        log.warning("hub unavailable: %s", why)
    refusal = HUB_UNAVAILABLE
    if retry_after is not None:
        refusal = dataclasses.replace(refusal, retry_after=max(1, min(retry_after, RETRY_AFTER_MAX)))
    return refusal.error()


def refusal_of(response: httpx.Response) -> ApiError:
    """The answer for a hub error response (X-Error-Code as the hub sets it)."""
    code = response.headers.get("X-Error-Code")
    status = response.status_code
    if status == 429 or status >= 500:
        value = response.headers.get("Retry-After", "")
        return unavailable(int(value) if value.isdigit() else None, f"{status} from {response.url}")
    if code == "RevisionNotFound":
        return REVISION_NOT_FOUND.error()
    if code == "GatedRepo" or (status in (401, 403) and code != "RepoNotFound"):
        return HUB_ACCESS_DENIED.error()
    if code == "RepoNotFound" or status == 404:
        return REPO_NOT_FOUND.error()
    return unavailable(None, f"unexpected {status} ({code}) from {response.url}")


def select(paths: Sequence[str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    """huggingface_hub's allow/ignore semantics: fnmatch (case-sensitive, `*` crosses `/`), a
    pattern ending in `/` means everything below that directory; include None = everything."""

    def norm(pattern: str) -> str:
        return pattern + "*" if pattern.endswith("/") else pattern

    allow = [norm(p) for p in include] if include is not None else None
    ignore = [norm(p) for p in exclude or ()]
    return [
        p
        for p in paths
        if (allow is None or any(fnmatchcase(p, a) for a in allow)) and not any(fnmatchcase(p, i) for i in ignore)
    ]


class HubClient:
    """One creation's conversation with the hub (bearer token when the tenant has one)."""

    def __init__(self, http: httpx.AsyncClient, endpoint: str, repo_type: str, repo_id: str) -> None:
        self.http = http
        self.endpoint = endpoint.rstrip("/")
        self.api = f"{self.endpoint}/api/{repo_type}s/{repo_id}"
        self.files_base = f"{self.endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/resolve"

    async def _get(self, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.get(url, **kwargs)
        except httpx.HTTPError as exc:  # timeouts, refused connections, broken answers
            raise unavailable(None, f"{type(exc).__name__} for {url}") from exc
        if response.status_code != 200:
            raise refusal_of(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise unavailable(None, f"no JSON from {response.url}") from exc

    async def revision(self, revision: str) -> Revision:
        info = self._json(await self._get(f"{self.api}/revision/{quote(revision, safe='')}"))
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
            raise unavailable(None, f"no commit sha in the revision answer of {self.api}")
        restricted = bool(info.get("gated")) or bool(info.get("private"))
        return Revision(commit, await self._tree(commit), restricted)

    async def _tree(self, commit: str) -> list[HubFile]:
        files: list[HubFile] = []
        url: str | None = f"{self.api}/tree/{commit}"
        params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
        listed = 0
        while url is not None:
            response = await self._get(url, params=params)
            page = self._json(response)
            if not isinstance(page, list):
                raise unavailable(None, f"the tree answer of {url} is not a list")
            listed += len(page)
            files.extend(_file_of(entry) for entry in page if isinstance(entry, dict) and entry.get("type") == "file")
            following = response.links.get("next", {}).get("url")
            url, params = (urljoin(str(response.url), following) if following else None), None
            # The cursor link must stay on the hub: our token goes with it.
            if url is not None and urlsplit(url)[:2] != urlsplit(self.endpoint)[:2]:
                raise unavailable(None, f"the tree's next page {url} leaves the hub")
            if listed > MAX_LISTED:
                raise unavailable(None, f"more than {MAX_LISTED} tree entries")
        return files

    def file_url(self, commit: str, path: str) -> str:
        return f"{self.files_base}/{commit}/{quote(path, safe='/')}"

    async def check_access(self, commit: str, path: str) -> None:
        """A HEAD of one file: 2xx, or the redirect of an LFS file, means its bytes are ours."""
        url = self.file_url(commit, path)
        try:
            response = await self.http.head(url, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise unavailable(None, f"{type(exc).__name__} for {url}") from exc
        if response.status_code >= 400:
            raise refusal_of(response)

    async def sha256_of(self, commit: str, item: HubFile) -> str:
        """Hash a git-stored file, reading at most its listed size (a longer body is refused)."""
        url = self.file_url(commit, item.path)
        digest, got = hashlib.sha256(), 0
        try:
            async with self.http.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code != 200:
                    raise refusal_of(response)
                async for chunk in response.aiter_raw():
                    got += len(chunk)
                    if got > item.size:
                        break
                    digest.update(chunk)
        except httpx.HTTPError as exc:
            raise unavailable(None, f"{type(exc).__name__} for {url}") from exc
        if got != item.size:
            raise unavailable(None, f"{url} sent {got} bytes, the tree lists {item.size}")
        return digest.hexdigest()

    async def complete_hashes(self, commit: str, files: list[HubFile]) -> list[HubFile]:
        """The files with every sha256 known (git-stored ones hashed, HASH_CONCURRENCY at once)."""
        gate = asyncio.Semaphore(HASH_CONCURRENCY)

        async def one(item: HubFile) -> HubFile:
            if item.sha256 is not None:
                return item
            async with gate:
                return dataclasses.replace(item, sha256=await self.sha256_of(commit, item))

        return list(await asyncio.gather(*(one(f) for f in files)))


def _file_of(entry: dict[str, Any]) -> HubFile:
    path, size, lfs = entry.get("path"), entry.get("size"), entry.get("lfs")
    if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise unavailable(None, f"a tree entry without a path or size: {str(entry)[:200]}")
    if isinstance(lfs, dict):
        oid, lfs_size = lfs.get("oid"), lfs.get("size", size)
        if not isinstance(oid, str) or not SHA256.fullmatch(oid) or lfs_size != size:
            raise unavailable(None, f"an LFS entry without a sha256 or with another size: {path}")
        return HubFile(path, size, oid, True)
    return HubFile(path, size, None, False)
