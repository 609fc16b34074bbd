"""A parallel transfer's checkpoints (the resume point a heartbeat sends) always pair a byte count
with the sha256 of exactly that many bytes, even when taken while the hasher is mid-update: a
count paired with a digest of more bytes is a resume point that never matches, and the next
attempt fetches the whole file again (it did, one kill in about six, before Transfer._hash_lock)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from app.executor.transfer import HASH_READ, Transfer
from tests.support.file_server import FileServer

SIZE = 12 * HASH_READ  # a dozen hasher updates, each long enough for many checkpoints to land inside


def test_every_checkpoint_names_the_digest_of_exactly_its_bytes(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    server = FileServer()
    server.add(tmp_path / "served", "org/model", "v1", "big.bin", content)
    base = server.start()
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    transfer = Transfer(url=f"{base}/org/model/resolve/v1/big.bin", headers={}, fd=fd, size=SIZE, connections=4)
    points: list[tuple[int, str]] = []
    done = threading.Event()

    def checkpoints() -> None:
        while not done.is_set():
            points.append(transfer.checkpoint())

    poller = threading.Thread(target=checkpoints, daemon=True)
    poller.start()
    try:
        whole = transfer.run()
    finally:
        done.set()
        poller.join()
        os.close(fd)
        server.close()
    assert whole == hashlib.sha256(content).hexdigest()
    inside = {n for n, _ in points if 0 < n < SIZE}
    assert len(inside) >= 3, f"the poller saw too few distinct resume points to test anything: {sorted(inside)}"
    expected = prefix_digests(content, points)
    wrong = [n for n, digest in points if digest != expected[n]]
    assert not wrong, f"{len(wrong)} of {len(points)} checkpoints paired a count with another prefix's digest"


def prefix_digests(content: bytes, points: list[tuple[int, str]]) -> dict[int, str]:
    """sha256 of content[:n] for every n the checkpoints named, in one pass over the content."""
    digest, at, out = hashlib.sha256(), 0, {}
    for n in sorted({n for n, _ in points}):
        digest.update(content[at:n])
        at = n
        out[n] = digest.hexdigest()
    return out


def test_a_checkpoint_after_its_file_is_closed_raises_and_syncs_nothing(tmp_path: Path) -> None:
    """After the download's end closes the partial file, a heartbeat still holding the transfer
    gets OSError (it sends no checkpoint), never an fdatasync of the descriptor's next owner."""
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    transfer = Transfer(url="http://127.0.0.1:9/unused", headers={}, fd=fd, size=10)
    assert transfer.checkpoint() == (0, hashlib.sha256().hexdigest())
    transfer.close_fd()
    os.close(fd)
    # Usually the same number again (the lowest free one; another thread may take it first):
    # without close_fd the checkpoint would then sync this file and report success.
    reused = os.open(tmp_path / "another file", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="partial file is closed"):
            transfer.checkpoint()
    finally:
        os.close(reused)
