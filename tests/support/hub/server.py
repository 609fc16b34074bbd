"""The hub emulator's HTTP side: the routes of the Hugging Face Hub that downloads use, with
the hub's answers and headers (learned from its public docs and the huggingface_hub client):

  GET  /api/{models|datasets}/{ns}/{name}[/revision/{rev}][?blobs=true]   repo info (at a revision)
  GET  /api/{models|datasets}/{ns}/{name}/tree/{rev}[/{path}]?recursive=&expand=&cursor=
       a page of entries (1000; 50 with expand), next page in a `Link: <...>; rel="next"` header
  GET|HEAD /[datasets/]{ns}/{name}/resolve/{rev}/{path}   the file: a git file is answered here
       (ETag = git oid, X-Repo-Commit, Range), an LFS file is a 302 to the CDN with X-Linked-Etag
       (its sha256) and X-Linked-Size
  GET|HEAD {cdn}/{sha256}?expires=&sig=   the CDN (another origin: the client drops its token)

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)
and X-Error-Message headers and a JSON {"error": ...} body; faults (429 + Retry-After, delay,
down) come from Hub.faults."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.hub.repos import Blob, Commit, Hub, Repo

PAGE = 1000
PAGE_EXPANDED = 50
CHUNK = 64 * 1024
CDN_SECRET = b"emulated-cdn-signing-key"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _sign(sha256: str, expires: int) -> str:
    return hmac.new(CDN_SECRET, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub
    emulator: HubEmulator

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    # -- dispatch --------------------------------------------------------------------------
    def _answer(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path))
        faults = self.hub.faults
        try:
            if faults.delay:
                time.sleep(faults.delay)
            if faults.down:
                raise HubError(503, "Service Unavailable")
            with self.hub.lock:
                limited = faults.rate_limited > 0
                faults.rate_limited -= 1 if limited else 0
            if limited:
                raise HubError(429, "You have been rate-limited", headers={"Retry-After": str(faults.retry_after)})
            self._route(split.path, parse_qs(split.query), head=head)
        except HubError as exc:
            self._error(exc, head=head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, raw_path: str, query: dict[str, list[str]], *, head: bool) -> None:
        parts = raw_path.lstrip("/").split("/")  # still quoted: a revision may hold an encoded "/"
        if self.server is self.emulator.cdn:
            self._cdn(parts, query, head=head)
        elif parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo = self._visible(repo_type, f"{unquote(parts[2])}/{unquote(parts[3])}")
            if len(parts) == 4 and not head:  # the info at the default branch
                self._revision(repo, "main", query)
            elif len(parts) < 6:
                raise HubError(404, "Not Found")
            elif parts[4] == "revision" and len(parts) == 6 and not head:
                self._revision(repo, unquote(parts[5]), query)
            elif parts[4] == "tree" and not head:
                self._tree(repo, unquote(parts[5]), unquote("/".join(parts[6:])), query)
            else:
                raise HubError(404, "Not Found")
        else:
            repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
            rest = parts[1:] if repo_type == "dataset" else parts
            if len(rest) < 5 or rest[2] != "resolve":
                raise HubError(404, "Not Found")
            repo = self._visible(repo_type, f"{unquote(rest[0])}/{unquote(rest[1])}")
            self._resolve(repo, unquote(rest[3]), unquote("/".join(rest[4:])), head=head)

    # -- access ----------------------------------------------------------------------------
    def _token(self) -> str | None:
        value = self.headers.get("Authorization", "")
        token = value[7:] if value.startswith("Bearer ") else None
        if token is not None and token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _visible(self, repo_type: str, repo_id: str) -> Repo:
        token = self._token()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or not repo.readable_by(token):
            # Like the hub: a private repository is indistinguishable from a missing one, and an
            # anonymous caller gets 401 for both.
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ----------------------------------------------------------------------------
    def _revision(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> None:
        commit = self._commit(repo, revision)
        blobs = query.get("blobs", ["false"])[0] == "true"
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                entry = blob.tree_entry(path)
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    lfs = entry["lfs"]
                    assert isinstance(lfs, dict)
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date.isoformat().replace("+00:00", "Z"),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
            "createdAt": commit.date.isoformat().replace("+00:00", "Z"),
        }
        self._json(200, info)

    def _tree(self, repo: Repo, revision: str, prefix: str, query: dict[str, list[str]]) -> None:
        commit = self._commit(repo, revision)
        recursive = query.get("recursive", ["false"])[0] == "true"
        expand = query.get("expand", ["false"])[0] == "true"
        entries = list(_tree_entries(commit, prefix.strip("/"), recursive=recursive, expand=expand))
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        start = int(base64.urlsafe_b64decode(query["cursor"][0]).decode()) if "cursor" in query else 0
        size = PAGE_EXPANDED if expand else PAGE
        page, more = entries[start : start + size], start + size < len(entries)
        headers = {}
        if more:
            cursor = base64.urlsafe_b64encode(str(start + size).encode()).decode()
            host = self.headers.get("Host") or self.emulator.url.removeprefix("http://")
            path = urlsplit(self.path).path
            link = f"http://{host}{path}?recursive={str(recursive).lower()}&expand={str(expand).lower()}"
            headers["Link"] = f'<{link}&cursor={quote(cursor)}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, repo: Repo, revision: str, path: str, *, head: bool) -> None:
        commit = self._commit(repo, revision)
        token = self._token()
        if not repo.files_readable_by(token):
            kind = f"{repo.repo_type} {repo.repo_id}"
            if token is None:
                message = f"Access to {kind} is restricted. You must have access to it and be authenticated."
                raise HubError(401, message, "GatedRepo")
            raise HubError(403, f"Access to {kind} is restricted and you are not in the authorized list.", "GatedRepo")
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        common = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if blob.lfs:
            expires = int(time.time()) + 3600
            location = f"{self.emulator.cdn_url}/{blob.sha256}?expires={expires}&sig={_sign(blob.sha256, expires)}"
            headers = common | {
                "Location": location,
                "ETag": f'"{blob.oid}"',
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(blob.size),
                "Content-Length": "0",
            }
            self._send(302, headers, b"", head=head)
            return
        name = path.rsplit("/", 1)[-1]
        headers = common | {
            "ETag": f'"{blob.oid}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
        }
        self._content(blob, headers, head=head)

    def _cdn(self, parts: list[str], query: dict[str, list[str]], *, head: bool) -> None:
        sha256 = parts[0] if parts else ""
        expires = int(query.get("expires", ["0"])[0])
        signature = query.get("sig", [""])[0]
        if not hmac.compare_digest(signature, _sign(sha256, expires)) or expires < time.time():
            raise HubError(403, "Request has expired or the signature does not match")
        blob = self.emulator.blob_by_sha256(sha256)
        if blob is None:
            raise HubError(404, "Not Found")
        self._content(blob, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}, head=head)

    # -- answers ---------------------------------------------------------------------------
    def _content(self, blob: Blob, headers: dict[str, str], *, head: bool) -> None:
        start, end = 0, blob.size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            try:
                unit, _, spec = wanted.partition("=")
                first, _, last = spec.partition("-")
                start = int(first) if first else max(blob.size - int(last), 0)
                end = min(int(last), blob.size - 1) if first and last else blob.size - 1
                if unit != "bytes" or start > end or start >= blob.size:
                    raise ValueError(wanted)
            except ValueError:
                raise HubError(
                    416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{blob.size}"}
                ) from None
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{blob.size}"}
        body = blob.content[start : end + 1]
        if not head:
            with self.emulator.lock:  # file bytes served, for tests that a copy downloads nothing
                self.emulator.content_bytes += len(body)
        self._send(status, headers | {"Content-Type": "application/octet-stream"}, body, head=head)

    def _json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        self._send(status, (headers or {}) | {"Content-Type": "application/json; charset=utf-8"}, body, head=False)

    def _error(self, exc: HubError, *, head: bool) -> None:
        headers = exc.headers | {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        body = json.dumps({"error": exc.message}).encode()
        self._send(exc.status, headers | {"Content-Type": "application/json; charset=utf-8"}, body, head=head)

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, head: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        for offset in range(0, len(body), CHUNK):
            self.wfile.write(body[offset : offset + CHUNK])
            if self.emulator.chunk_delay:
                self.wfile.flush()
                time.sleep(self.emulator.chunk_delay)


def _tree_entries(commit: Commit, prefix: str, *, recursive: bool, expand: bool) -> Iterator[dict[str, object]]:
    """Entries under `prefix`: directories (each once) and files, in path order."""
    base = f"{prefix}/" if prefix else ""
    seen_dirs: set[str] = set()
    for path in sorted(commit.files):
        if not path.startswith(base):
            continue
        rest = path[len(base) :].split("/")
        for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
            directory = base + "/".join(rest[:depth])
            if directory not in seen_dirs:
                seen_dirs.add(directory)
                oid = hashlib.sha1(f"{commit.sha}:{directory}".encode(), usedforsecurity=False).hexdigest()
                yield {"type": "directory", "oid": oid, "size": 0, "path": directory}
        if recursive or len(rest) == 1:
            entry = commit.files[path].tree_entry(path)
            if expand:
                date = commit.date.isoformat().replace("+00:00", "Z")
                entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": date}
            yield entry


class HubEmulator:
    """The hub (127.0.0.1) and its CDN (127.0.0.2): two hosts. Use as a context manager."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub or Hub()
        self.chunk_delay = 0.0  # seconds between 64 KiB chunks of a file body (slow downloads)
        self.content_bytes = 0  # file-content bytes answered to GETs (not HEADs, not API JSON)
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self.hub, "emulator": self})
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # Another host, not only another port (as cdn-lfs.hf.co is): clients compare host names.
        self.cdn = ThreadingHTTPServer(("127.0.0.2", 0), handler)
        for server in (self.api, self.cdn):
            server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.cdn_url = f"http://127.0.0.2:{self.cdn.server_address[1]}"

    def blob_by_sha256(self, sha256: str) -> Blob | None:
        for repo in list(self.hub.repos.values()):
            for commit in list(repo.commits.values()):
                for blob in commit.files.values():
                    if blob.lfs and blob.sha256 == sha256:
                        return blob
        return None

    def __enter__(self) -> HubEmulator:
        for server in (self.api, self.cdn):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()


@contextmanager
def running_hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator
