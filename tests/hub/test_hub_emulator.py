"""The hub emulator is faithful: the real huggingface_hub client (pinned in uv.lock), pointed at
it, resolves revisions, lists trees page by page, downloads files (git and LFS, through the CDN
redirect), filters with allow/ignore patterns, and raises its own errors for gated, private and
missing repositories and revisions."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from tests.support.hub import HubEmulator, git_blob_oid, running_hub

FILES = {
    "config.json": b'{"model_type": "toy"}\n',
    "README.md": b"# toy\n",
    "model.safetensors": os.urandom(300_000),
    "sub/dir/tokenizer.json": b'{"v": 1}',
    "sub/weights.bin": os.urandom(70_000),
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[HubEmulator]:
    with running_hub() as hub:
        public = hub.hub.repo("org/toy")
        public.commit(FILES)
        gated = hub.hub.repo("org/gated", gated="manual")
        gated.commit({"config.json": b"{}", "model.safetensors": b"g" * 1000})
        hub.hub.grant(gated, "hf_accepted")
        hub.hub.user_token("hf_other")
        data = hub.hub.repo("org/data", repo_type="dataset")
        data.commit({"train.parquet": b"p" * 5000, "README.md": b"data"})
        yield hub


@pytest.fixture
def cache() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dlw-hf-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_snapshot_download_gets_every_file(emulator, cache):
    path = Path(snapshot_download("org/toy", endpoint=emulator.url, cache_dir=cache, token=False))
    got = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert got == FILES
    commit = emulator.hub.repos[("model", "org/toy")].refs["main"]
    assert path.name == commit  # the snapshot folder is the resolved commit


def test_allow_and_ignore_patterns(emulator, cache):
    path = Path(
        snapshot_download(
            "org/toy",
            endpoint=emulator.url,
            cache_dir=cache,
            token=False,
            allow_patterns=["*.json", "sub/"],
            ignore_patterns=["sub/dir/*"],
        )
    )
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == ["config.json", "sub/weights.bin"]


def test_hf_hub_download_git_and_lfs_files(emulator, cache):
    for name in ("config.json", "model.safetensors"):
        local = hf_hub_download("org/toy", name, endpoint=emulator.url, cache_dir=cache, token=False)
        assert Path(local).read_bytes() == FILES[name]
    # The LFS file came from the CDN, another origin, after a redirect.
    assert any(method == "GET" for method, _ in emulator.hub.requests)


def test_dataset_and_tag_and_commit(emulator, cache):
    local = hf_hub_download(
        "org/data", "train.parquet", repo_type="dataset", endpoint=emulator.url, cache_dir=cache, token=False
    )
    assert Path(local).read_bytes() == b"p" * 5000
    repo = emulator.hub.repos[("model", "org/toy")]
    repo.tag("v1", repo.refs["main"])
    info = HfApi(endpoint=emulator.url, token=False).model_info("org/toy", revision="v1", files_metadata=True)
    assert info.sha == repo.refs["main"]
    by_name = {s.rfilename: s for s in info.siblings or []}
    assert by_name["model.safetensors"].lfs is not None
    assert by_name["model.safetensors"].lfs.sha256 == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert by_name["config.json"].blob_id == git_blob_oid(FILES["config.json"])


def test_tree_pagination_of_a_big_repository(emulator):
    repo = emulator.hub.repo("org/big")
    repo.commit({f"shard/{i:05d}.bin": str(i).encode() for i in range(2_345)})
    api = HfApi(endpoint=emulator.url, token=False)
    before = len(emulator.hub.requests)
    files = [f for f in api.list_repo_tree("org/big", recursive=True) if hasattr(f, "lfs")]
    assert len(files) == 2_345
    assert files[7].path == "shard/00007.bin" and files[7].lfs.sha256 == hashlib.sha256(b"7").hexdigest()
    assert len(emulator.hub.requests) - before == 3  # 1000 + 1000 + 346 entries (with the directory)
    expanded = list(api.list_repo_tree("org/big", path_in_repo="shard", expand=True))
    assert len(expanded) == 2_345 and expanded[0].last_commit is not None


def test_gated_repo_with_and_without_token(emulator, cache):
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", endpoint=emulator.url, cache_dir=cache, token=False)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", endpoint=emulator.url, cache_dir=cache, token="hf_other")
    path = Path(snapshot_download("org/gated", endpoint=emulator.url, cache_dir=cache, token="hf_accepted"))
    assert (path / "model.safetensors").read_bytes() == b"g" * 1000


def test_private_missing_and_revision_errors(emulator, cache):
    private = emulator.hub.repo("org/secret", private=True)
    private.commit({"a.txt": b"a"})
    emulator.hub.grant(private, "hf_insider")
    api = HfApi(endpoint=emulator.url)
    for repo_id, token in (("org/secret", False), ("org/secret", "hf_other"), ("org/missing", False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(repo_id, token=token)
    assert api.model_info("org/secret", token="hf_insider").sha == private.refs["main"]
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/toy", revision="no-such-branch", token=False)


def test_range_requests_and_headers(emulator):
    repo = emulator.hub.repos[("model", "org/toy")]
    url = f"{emulator.url}/org/toy/resolve/main/config.json"
    head = httpx.head(url)
    assert head.headers["X-Repo-Commit"] == repo.refs["main"]
    assert head.headers["ETag"] == f'"{git_blob_oid(FILES["config.json"])}"'
    part = httpx.get(url, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206 and part.content == FILES["config.json"][2:6]
    assert part.headers["Content-Range"] == f"bytes 2-5/{len(FILES['config.json'])}"
    lfs = httpx.head(f"{emulator.url}/org/toy/resolve/main/model.safetensors")
    assert lfs.status_code == 302 and lfs.headers["Location"].startswith(emulator.cdn_url)
    assert lfs.headers["X-Linked-Etag"] == f'"{hashlib.sha256(FILES["model.safetensors"]).hexdigest()}"'
    assert lfs.headers["X-Linked-Size"] == str(len(FILES["model.safetensors"]))


def test_rate_limit_and_down(emulator):
    emulator.hub.faults.rate_limited = 1
    limited = httpx.get(f"{emulator.url}/api/models/org/toy/revision/main")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert httpx.get(f"{emulator.url}/api/models/org/toy/revision/main").status_code == 200


@pytest.mark.parametrize(
    ("include", "exclude"),
    [
        (None, None),
        (["*.json"], None),
        (None, ["*.bin"]),
        (["sub/"], ["sub/dir/*"]),
        (["*.safetensors", "README*"], [".*"]),
        (["sub/*"], None),
        (["*/tokenizer.json"], ["config.json"]),
        (["[cR]*"], None),
    ],
)
def test_include_exclude_select_what_huggingface_hub_selects(include, exclude):
    """The API's selection (app/api/hub.select) against huggingface_hub's own filter."""
    from huggingface_hub.utils import filter_repo_objects

    from app.api.hub import select

    paths = [*FILES, ".gitattributes", "sub/.hidden", "Sub/x.bin"]
    expected = list(filter_repo_objects(paths, allow_patterns=include, ignore_patterns=exclude))
    assert select(paths, include, exclude) == expected
