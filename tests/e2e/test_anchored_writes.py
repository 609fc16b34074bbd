"""The executor's writes after placement() checked a path (app/executor/anchored.py), on a real
filesystem: a tenant that can write under its root swaps a directory on the path for a link to
another tenant's tree between the check and the write (injected here right after the real
placement). Opening the partial, publishing (tree and hf-cache: blob, snapshot link, ref),
placing from a stored copy and discarding are all refused or harmless; the other tenant's files
stay as they were and nothing new appears in its tree."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.executor import anchored
from app.executor.anchored import UnsafePath, open_directory, remove
from app.executor.download import discard, open_partial
from app.executor.layout import Placement, placement, publish
from app.executor.stored_copy import from_stored_copy
from tests.e2e.test_storage_layout import item

SHA_ABC = hashlib.sha256(b"abc").hexdigest()


def _swap_for_link(directory: Path, target: Path) -> None:
    """What the tenant does: its directory becomes a link to someone else's."""
    shutil.rmtree(directory)
    os.symlink(target, directory)


def _listing(top: Path) -> dict[str, bytes | str]:
    """Every name under top with its bytes (files) or target (links): what must not change."""
    seen: dict[str, bytes | str] = {}
    for path in sorted(top.rglob("*")):
        key = str(path.relative_to(top))
        seen[key] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return seen


@pytest.fixture
def theirs(tmp_path: Path) -> Path:
    """Another tenant's tree, with a file named like ours."""
    other = tmp_path / "other-tenant"
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "w.bin").write_bytes(b"theirs")
    return other


def test_the_partial_is_not_opened_through_a_directory_swapped_since_placement(tmp_path: Path, theirs: Path):
    root = tmp_path / "plain"
    claimed = item(storage_root=str(root))
    place = placement([tmp_path / "default", tmp_path], claimed)
    place.partial.parent.mkdir(parents=True)
    (theirs / "sub" / place.partial.name).write_bytes(b"bait")  # a partial of the same name there
    before = _listing(theirs)
    _swap_for_link(place.partial.parent.parent, theirs)  # org/model/main -> the other tree
    with pytest.raises(UnsafePath):
        open_partial(place)
    discard([tmp_path / "default", tmp_path], claimed)  # refused the same way: nothing removed there
    assert _listing(theirs) == before


def test_a_tree_publication_after_a_swap_writes_nothing_outside(tmp_path: Path, theirs: Path):
    root = tmp_path / "plain"
    claimed = item(storage_root=str(root))
    place = placement([tmp_path / "default", tmp_path], claimed)
    fd = open_partial(place)  # made in the real directory
    os.write(fd, b"abc")
    os.close(fd)
    (theirs / "sub" / place.partial.name).write_bytes(b"bait")  # a partial of the same name there
    before = _listing(theirs)
    _swap_for_link(place.final.parent.parent, theirs)  # .../main -> theirs: main/sub/w.bin is theirs/sub/w.bin
    with pytest.raises(UnsafePath):
        publish(place, claimed, SHA_ABC, None)
    assert _listing(theirs) == before


@pytest.mark.parametrize("swapped", ["snapshots", "refs", "blobs"])
def test_an_hf_cache_publication_after_a_swap_writes_nothing_outside(tmp_path: Path, swapped: str):
    claimed = item(storage_root=str(tmp_path / "cache"), storage_layout="hf-cache")
    place = placement([tmp_path / "default", tmp_path], claimed)
    assert place.repo_dir is not None
    fd = open_partial(place)
    os.write(fd, b"abc")
    os.close(fd)
    elsewhere = tmp_path / "other-tenant" / swapped
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep").write_bytes(b"theirs")
    (place.repo_dir / swapped).mkdir(exist_ok=True)
    if swapped == "blobs":  # the partial moves aside first: it would go with the directory
        os.rename(place.partial, tmp_path / "aside")
        _swap_for_link(place.repo_dir / swapped, elsewhere)
        os.rename(tmp_path / "aside", elsewhere / place.partial.name)  # the partial's name resolves there
    else:
        _swap_for_link(place.repo_dir / swapped, elsewhere)
    before = _listing(elsewhere)
    with pytest.raises(UnsafePath):
        publish(place, claimed, SHA_ABC, "0" * 40)  # a git blob id: the partial is read to compare
    assert _listing(elsewhere) == before
    if swapped == "snapshots":  # the blob went in before the link was refused: in its own blobs/
        assert (place.repo_dir / "blobs" / SHA_ABC).read_bytes() == b"abc"


def test_a_stored_copy_is_not_linked_in_through_a_swapped_directory(
    tmp_path: Path, theirs: Path, monkeypatch: pytest.MonkeyPatch
):
    """The claim names a stored copy (its own earlier file); right after copy_source() checked it,
    the tenant swaps that copy's directory for a link to another tenant's tree holding a file of
    the right size under the same name. Nothing is linked or copied in from there: the file is
    downloaded as usual instead."""
    root = tmp_path / "plain"
    first = item(storage_root=str(root), id="f0")
    stored = placement([tmp_path / "default", tmp_path], first)
    fd = open_partial(stored)
    os.write(fd, b"abc")
    os.close(fd)
    publish(stored, first, SHA_ABC, None)
    (theirs / "sub" / "w.bin").write_bytes(b"xyz")  # theirs: the same size, other bytes
    second = item(storage_root=str(root), id="f2", revision="v2", sha256=SHA_ABC, stored_path=stored.stored_path)
    place = placement([tmp_path / "default", tmp_path], second)
    checked = Placement.copy_source

    def then_swapped(self: Placement, stored_path: str) -> Path:
        source = checked(self, stored_path)
        _swap_for_link(stored.final.parent.parent, theirs)
        return source

    monkeypatch.setattr(Placement, "copy_source", then_swapped)
    place.partial.parent.mkdir(parents=True)  # as an earlier attempt left it: the link would be made
    assert from_stored_copy(place, second) is None
    assert not place.partial.exists()
    assert (theirs / "sub" / "w.bin").stat().st_nlink == 1  # not hard-linked into our tree


def test_the_walk_refuses_a_path_outside_its_base_and_makes_what_is_missing(tmp_path: Path):
    storage, base = tmp_path / "storage", tmp_path / "storage" / "t" / "base"
    storage.mkdir()
    with pytest.raises(UnsafePath):
        open_directory(base, tmp_path / "elsewhere", made_from=storage)
    assert open_directory(base, base / "a" / "b") is None  # missing, nothing made
    assert not base.exists()
    fd = open_directory(base, base / "a" / "b", made_from=storage)  # the base's own directories too
    assert fd is not None
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(base / "a" / "b")
    finally:
        os.close(fd)
    (base / "a" / "f").write_bytes(b"")
    with pytest.raises(UnsafePath):
        open_directory(base, base / "a" / "f" / "c", made_from=storage)  # a file where a directory goes


def test_a_missing_target_root_is_not_made_through_a_link_above_it(tmp_path: Path):
    """A target root inside the tenant's own tree, not made yet; the tenant swaps a directory
    above it for a link into another tenant's directory. The root's directories are made from
    the executor's own storage root, so the link is met and nothing appears over there."""
    first = tmp_path / "first"
    (first / "acme" / "t").mkdir(parents=True)
    other = first / "other"
    other.mkdir()
    claimed = item(storage_root=str(first / "acme" / "t" / "x"))
    place = placement([first], claimed)
    (first / "acme" / "t").rmdir()
    os.symlink(other, first / "acme" / "t")
    with pytest.raises(UnsafePath):
        open_partial(place)
    assert list(other.iterdir()) == []


def test_a_directory_removed_while_it_is_opened_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The executor's own pruning (or the tenant) removes the partial's directory right after it
    was opened: that is a missing directory, made again, not a link out of the target."""
    claimed = item(storage_root=str(tmp_path / "plain"))
    place = placement([tmp_path / "default", tmp_path], claimed)
    place.partial.parent.mkdir(parents=True)
    real_open, removed = os.open, []

    def open_then_removed(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if path == str(place.partial.parent) and not removed:
            os.rmdir(path)
            removed.append(path)
        return fd

    monkeypatch.setattr(anchored.os, "open", open_then_removed)
    fd = open_partial(place)
    os.close(fd)
    assert removed and place.partial.is_file()


def test_missing_directories_are_not_made_through_a_swapped_link(tmp_path: Path):
    """The partial's own directory does not exist yet and one above it is now a link: the
    directories are made one name at a time from the base, so the link is met and refused, and
    nothing is made in the tree it points to."""
    claimed = item(storage_root=str(tmp_path / "plain"), path="deep/er/w.bin")
    place = placement([tmp_path / "default", tmp_path], claimed)
    elsewhere = tmp_path / "other-tenant"
    elsewhere.mkdir()
    (tmp_path / "plain" / "org" / "model").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "plain" / "org" / "model" / "main")  # after placement() found nothing
    with pytest.raises(UnsafePath):
        open_partial(place)
    assert list(elsewhere.iterdir()) == []


def test_a_directory_renamed_to_look_removed_is_not_taken_for_missing(tmp_path: Path):
    """The kernel names a removed directory "<path> (deleted)"; a tenant can name one so and link
    the old name to it. That is a link on the way (refused), not a missing directory: a removal
    there must not report the file gone while it stays."""
    claimed = item(storage_root=str(tmp_path / "plain"))
    place = placement([tmp_path / "default", tmp_path], claimed)
    fd = open_partial(place)
    os.close(fd)
    folder = place.partial.parent
    os.rename(folder, f"{folder} (deleted)")
    os.symlink(f"{folder} (deleted)", folder)
    with pytest.raises(UnsafePath):
        remove(place.base, place.partial)
    assert Path(f"{folder} (deleted)", place.partial.name).exists()
