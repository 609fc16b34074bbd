"""What the hub emulator serves: repositories with branches, tags and commits of files, and who
may read them. Shapes follow the Hugging Face Hub: a file is stored in git (its `oid` is the git
blob sha1) or in LFS (then `lfs.oid` is the content's sha256 and the tree also gives the git
pointer's size); a commit is a 40-hex sha; a private repository is invisible without access, a
gated one is listed publicly but its files need an accepted token."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase

# What the hub stores in LFS by default (.gitattributes of a new model repository, abridged).
LFS_PATTERNS = ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.onnx", "*.gguf", "*.h5", "*.msgpack", "*.parquet")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: sha1 over "blob <size>\\0" and the content."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file that git stores in place of the content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """The git blob id: of the pointer for an LFS file, of the content otherwise."""
        return git_blob_oid(lfs_pointer(self.sha256, self.size) if self.lfs else self.content)

    def tree_entry(self, path: str) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs:
            pointer = lfs_pointer(self.sha256, self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    sha: str
    title: str
    date: datetime
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str  # model | dataset
    repo_id: str
    private: bool = False
    gated: bool | str = False  # False | "auto" | "manual", as the hub's `gated` field
    readers: set[str] = field(default_factory=set)  # tokens with access (private, or accepted gate)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(
        self, files: dict[str, bytes], *, branch: str = "main", title: str = "update", lfs: set[str] | None = None
    ) -> str:
        """Commit `files` (the whole tree) on `branch`; returns the new commit's sha. A file is in
        LFS when listed in `lfs`, or (lfs None) when its name matches LFS_PATTERNS."""
        blobs = {
            path: Blob(content, path in lfs if lfs is not None else any(fnmatchcase(path, p) for p in LFS_PATTERNS))
            for path, content in files.items()
        }
        parent = self.refs.get(branch, "")
        sha = hashlib.sha1(f"{self.repo_id}\n{branch}\n{parent}\n{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = Commit(sha, title, datetime.now(UTC), blobs)
        self.refs[branch] = sha
        return sha

    def tag(self, name: str, sha: str) -> None:
        self.refs[name] = sha

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag, a full commit sha (or `refs/heads/x` / `refs/tags/x`)."""
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = self.refs.get(name, name)
        return self.commits.get(sha)

    def readable_by(self, token: str | None) -> bool:
        """May this token see the repository at all (a private one is hidden otherwise)?"""
        return not self.private or (token is not None and token in self.readers)

    def files_readable_by(self, token: str | None) -> bool:
        """May this token download files (a gated repository needs an accepted token)?"""
        return self.readable_by(token) and (not self.gated or (token is not None and token in self.readers))


@dataclass
class Faults:
    """Misbehaviour on demand: the next `rate_limited` answers are 429 with Retry-After; every
    answer waits `delay` seconds first; `down` answers 503 (as the hub's front does when down)."""

    rate_limited: int = 0
    retry_after: int = 7
    delay: float = 0.0
    down: bool = False


class Hub:
    """The emulator's state, shared by its request threads."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: set[str] = set()  # tokens the hub knows (others: 401 invalid credentials)
        self.faults = Faults()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request

    def repo(self, repo_id: str, repo_type: str = "model", **kwargs: object) -> Repo:
        repo = Repo(repo_type, repo_id, **kwargs)  # type: ignore[arg-type]
        self.repos[(repo_type, repo_id)] = repo
        self.tokens.update(repo.readers)
        return repo

    def grant(self, repo: Repo, token: str) -> None:
        repo.readers.add(token)
        self.tokens.add(token)

    def user_token(self, token: str) -> None:
        """A valid token of a user without any special access."""
        self.tokens.add(token)
