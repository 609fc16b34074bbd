"""Where the reference executor puts a claimed file (app/executor/layout.py, docs/storage.md), on
a real filesystem: roots it serves and roots it refuses, and the hf-cache publication (blob,
relative link, ref; atomic replacements, nothing left behind)."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from app.executor.client import Claimed
from app.executor.layout import NoCommit, Placement, Unreachable, UnsafePath, blob_name, git_blob_id, placement, publish
from app.executor.settings import Config, add_run_arguments, config_from
from app.executor.stored_copy import from_stored_copy

COMMIT = "c" * 40


def item(**overrides: Any) -> Claimed:
    values: dict[str, Any] = {
        "id": "f1",
        "tenant": "acme",
        "repo_id": "org/model",
        "revision": "main",
        "path": "sub/w.bin",
        "size": 3,
        "sha256": None,
        "token": "t",
        "lease_seconds": 60,
        "commit": COMMIT,
    }
    return Claimed(**{**values, **overrides})


def test_roots_served_and_refused(tmp_path: Path):
    first, more = tmp_path / "first", tmp_path / "more"
    first.mkdir()
    more.mkdir()
    storages = [first, more]
    # no root: the default tree under the first root
    assert placement(storages, item()).final == first / "acme" / "org" / "model" / "main" / "sub" / "w.bin"
    # a root that is a --storage root, or inside one
    assert placement(storages, item(storage_root=str(more))).final == more / "org" / "model" / "main" / "sub" / "w.bin"
    inside = more / "x" / "y"
    assert placement(storages, item(storage_root=str(inside))).final.is_relative_to(inside)
    # inside the first root only within the tenant's own directory (the others' default trees)
    assert placement(storages, item(storage_root=str(first / "acme" / "t"))).final.is_relative_to(first / "acme")
    for root in (first, first / "other-tenant", first / "other-tenant" / "x", tmp_path / "elsewhere", tmp_path):
        with pytest.raises(Unreachable):
            placement(storages, item(storage_root=str(root)))
    # through a symbolic link: refused even when it leads into a served root
    (more / "real").mkdir()
    os.symlink(more / "real", more / "alias")
    with pytest.raises(Unreachable, match="symbolic link"):
        placement(storages, item(storage_root=str(more / "alias")))
    with pytest.raises(UnsafePath):
        placement(storages, item(storage_root=str(more), path="../../escape"))


def test_a_root_above_the_default_storage_is_refused(tmp_path: Path):
    """Storage roots nested with the first (every tenant's default tree) inside another: a target
    root that contains the first would let a repository named like <dir>/<dir> and a revision
    named after another tenant write into that tenant's default tree. Refused; a sibling is not."""
    outer = tmp_path / "srv"
    first = outer / "x" / "default"
    first.mkdir(parents=True)
    storages = [first, outer]
    for root in (outer, outer / "x"):
        with pytest.raises(Unreachable, match="contains this executor's default storage"):
            placement(storages, item(storage_root=str(root), repo_id="x/default", revision="victim"))
    beside = placement(storages, item(storage_root=str(outer / "y")))
    assert beside.final.is_relative_to(outer / "y")


def test_hf_cache_needs_a_commit_and_names_folders_like_huggingface_hub(tmp_path: Path):
    root = str(tmp_path / "cache")
    with pytest.raises(NoCommit):
        placement([tmp_path / "default", tmp_path], item(storage_root=root, storage_layout="hf-cache", commit=None))
    # a revision that is a commit is its own
    pinned = placement(
        [tmp_path / "default", tmp_path],
        item(storage_root=root, storage_layout="hf-cache", commit=None, revision=COMMIT),
    )
    assert pinned.link == tmp_path / "cache" / "models--org--model" / "snapshots" / COMMIT / "sub" / "w.bin"
    ds = placement(
        [tmp_path / "default", tmp_path], item(storage_root=root, storage_layout="hf-cache", repo_type="dataset")
    )
    assert ds.repo_dir == tmp_path / "cache" / "datasets--org--model"
    assert ds.partial == ds.repo_dir / "blobs" / "f1.incomplete"  # hidden from snapshots, found again by id


def test_publish_makes_blob_then_relative_link_then_ref_and_replaces_atomically(tmp_path: Path):
    claimed = item(storage_root=str(tmp_path / "cache"), storage_layout="hf-cache")
    place = placement([tmp_path / "default", tmp_path], claimed)
    place.partial.parent.mkdir(parents=True)
    place.partial.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    link = publish(place, claimed, sha, f"{sha}")
    assert link == place.link and os.readlink(link) == "../../../blobs/" + sha  # relative, from snapshots/<c>/sub/
    assert link.read_bytes() == b"abc" and not place.partial.exists()
    assert (place.repo_dir / "refs" / "main").read_text() == COMMIT  # type: ignore[operator]
    # a second publication of the same file (another attempt) replaces the link and ref in place
    place.partial.write_bytes(b"abc")
    publish(place, claimed, sha, None)
    assert sorted(p.name for p in (place.repo_dir / "blobs").iterdir()) == [sha]  # type: ignore[operator]
    assert sorted(p.name for p in link.parent.iterdir()) == ["w.bin"]  # no temporary link left
    assert sorted(p.name for p in (place.repo_dir / "refs").iterdir()) == ["main"]  # type: ignore[operator]
    # Links planted under the temporary names are replaced, never written through.
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    refs = place.repo_dir / "refs"  # type: ignore[operator]
    os.symlink(precious, refs / f".main.{claimed.id}.tmp")
    os.symlink(precious, link.parent / f".w.bin.{claimed.id}.link")
    place.partial.write_bytes(b"abc")
    publish(place, claimed, sha, None)
    assert precious.read_text() == "keep me" and (refs / "main").read_text() == COMMIT
    assert sorted(p.name for p in refs.iterdir()) == ["main"] and os.readlink(link) == "../../../blobs/" + sha


def test_hf_cache_blobs_and_refs_that_are_links_out_of_the_repository_are_refused(tmp_path: Path):
    """blobs/ and refs/ are resolved like every other directory of a placement: a link planted
    there (a tenant-writable cache) would take the bytes, the ref or a deletion out of the target."""
    claimed = item(storage_root=str(tmp_path / "cache"), storage_layout="hf-cache")
    repo = placement([tmp_path / "default", tmp_path], claimed).repo_dir
    assert repo is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    repo.mkdir(parents=True)
    for name in ("blobs", "refs"):
        os.symlink(outside, repo / name)
        with pytest.raises(UnsafePath):
            placement([tmp_path / "default", tmp_path], claimed)
        (repo / name).unlink()
    (repo / "blobs").mkdir()
    assert placement([tmp_path / "default", tmp_path], claimed).final == repo / "blobs"


def test_names_the_server_sent_are_single_names_and_links_inside_are_followed(tmp_path: Path):
    """The file id names the partial file and the commit a snapshot folder: each must be one
    name. A directory that is a link to another inside the target is followed (the place is the
    resolved one, as Path.resolve() gives it); stored_path is relative to the target's base."""
    storages = [tmp_path / "s"]
    for bad in ({"id": "../f1"}, {"id": "a/b"}, {"id": ""}, {"tenant": "acme/x"}, {"tenant": ".."}):
        with pytest.raises(UnsafePath):
            placement(storages, item(**bad))
    cache = {"storage_root": str(tmp_path / "s" / "acme" / "c"), "storage_layout": "hf-cache"}
    for commit in ("../x", "a/../b", "", "a/b"):
        with pytest.raises((UnsafePath, NoCommit)):
            placement(storages, item(commit=commit, **cache))
    for repo_type in ("/tmp/evil", "../..", "a/b"):
        with pytest.raises(UnsafePath):
            placement(storages, item(repo_type=repo_type, **cache))
    plain = placement(storages, item())
    assert plain.partial == tmp_path / "s" / "acme" / "org" / "model" / "main" / "sub" / ".w.bin.f1.part"
    assert plain.stored_path == "org/model/main/sub/w.bin"
    (tmp_path / "s" / "acme" / "org" / "model" / "real").mkdir(parents=True)
    os.symlink("real", tmp_path / "s" / "acme" / "org" / "model" / "main")
    moved = placement(storages, item())
    assert moved.final == (tmp_path / "s" / "acme" / "org" / "model" / "real" / "sub" / "w.bin").resolve()
    assert moved.stored_path == "org/model/real/sub/w.bin"


def test_a_link_in_a_tenants_default_tree_never_leads_into_another_tenants(tmp_path: Path):
    """The default storage holds every tenant's tree at <first root>/<tenant>/: a link there that
    stays in the storage but leaves the tenant's directory is refused, as is the tenant's
    directory being a link, or a loop of links."""
    storages = [tmp_path / "s"]
    (tmp_path / "s" / "other" / "org").mkdir(parents=True)
    (tmp_path / "s" / "acme").mkdir()
    os.symlink(tmp_path / "s" / "other" / "org", tmp_path / "s" / "acme" / "org")
    with pytest.raises(UnsafePath):
        placement(storages, item())
    os.symlink(tmp_path / "s" / "other" / "org", tmp_path / "s" / "acme" / "models--org--model")
    with pytest.raises(UnsafePath):
        placement(storages, item(storage_layout="hf-cache"))
    (tmp_path / "s" / "acme" / "org").unlink()
    os.symlink("org", tmp_path / "s" / "acme" / "org")  # a link to itself
    with pytest.raises(UnsafePath):
        placement(storages, item())
    (tmp_path / "s" / "acme" / "org").unlink()
    (tmp_path / "s" / "acme" / "models--org--model").unlink()
    (tmp_path / "s" / "acme").rmdir()
    os.symlink(tmp_path / "s" / "other", tmp_path / "s" / "acme")
    with pytest.raises(UnsafePath):
        placement(storages, item())


def test_the_blob_is_named_by_the_hubs_etag_only_when_it_names_the_bytes(tmp_path: Path):
    (tmp_path / "b").write_bytes(b"hello\n")
    blob = Placement(tmp_path / "b", tmp_path, tmp_path)  # the partial file, as publish() names it
    sha = hashlib.sha256(b"hello\n").hexdigest()
    git = git_blob_id(blob)
    assert git == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
    assert blob_name(blob, sha, git) == git  # a git file: its blob id
    assert blob_name(blob, sha, sha) == sha  # an LFS file: its sha256
    assert blob_name(blob, sha, "0" * 40) == sha  # not these bytes: never a name on the server's word
    assert blob_name(blob, sha, None) == sha


def test_several_storage_roots_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def config(env: dict[str, str], *argv: str) -> Config | list[str]:
        for name in ("DLW_EXECUTOR_STORAGE", "DLW_EXECUTOR_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        parser = argparse.ArgumentParser()
        add_run_arguments(parser)
        return config_from(parser.parse_args(list(argv)))

    flags = config({"DLW_EXECUTOR_TOKEN": "t"}, "--storage", "/a", "--storage", "/b/c")
    assert isinstance(flags, Config) and flags.storages == (Path("/a"), Path("/b/c")) and flags.storage == Path("/a")
    env = config({"DLW_EXECUTOR_TOKEN": "t", "DLW_EXECUTOR_STORAGE": "/x:/y"})
    assert isinstance(env, Config) and env.storages == (Path("/x"), Path("/y"))
    afile = tmp_path / "file"
    afile.write_text("")
    bad = config({"DLW_EXECUTOR_TOKEN": "t"}, "--storage", "/a", "--storage", str(afile))
    assert bad == [f"--storage {afile} is not a directory (the executor writes files under it)"]


def test_a_stored_copy_is_hard_linked_and_only_a_usable_one(tmp_path: Path):
    root = tmp_path / "store"
    content = b"abc"
    want = hashlib.sha256(content).hexdigest()
    first = placement(root, item(id="f1", sha256=want))
    first.final.parent.mkdir(parents=True)
    first.final.write_bytes(content)
    assert first.stored_path == "org/model/main/sub/w.bin"  # relative to the target's base
    assert first.base == root.resolve() / "acme"

    # Another repository, same content: the partial becomes a hard link of the copy, then the file.
    second = item(id="f2", repo_id="org/other", sha256=want, stored_path=first.stored_path)
    place = placement(root, second)
    place.partial.parent.mkdir(parents=True)
    assert from_stored_copy(place, second) == want
    publish(place, second, want, None)
    assert os.stat(place.final).st_ino == os.stat(first.final).st_ino and not place.partial.exists()
    # The same path again (a second task of the same repository): no partial left behind.
    again = item(id="f3", sha256=want, stored_path=first.stored_path)
    place = placement(root, again)
    assert from_stored_copy(place, again) == want
    publish(place, again, want, None)
    assert [p.name for p in place.final.parent.iterdir()] == ["w.bin"]

    # Unusable copies are ignored (the file is then downloaded): gone, another size, outside the base.
    for stored, size in (("org/model/main/missing", 3), (first.stored_path, 4), ("../../etc/passwd", 3)):
        other = item(id="f4", repo_id="org/x", sha256=want, size=size, stored_path=stored)
        place = placement(root, other)
        place.partial.parent.mkdir(parents=True, exist_ok=True)
        assert from_stored_copy(place, other) is None
        assert not place.partial.exists()
    undeclared = item(id="f5", sha256=None, stored_path=first.stored_path)  # nothing to compare with
    assert from_stored_copy(placement(root, undeclared), undeclared) is None
