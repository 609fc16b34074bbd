"""The small-file lane (app/executor/curl_lane.py): files below 8 MiB fetched by libcurl from one
thread hold the byte path's promises — verified bytes in place, the declared size (never a byte
past it, and not fewer), error statuses with their Retry-After, only http(s), the hub token
never sent to another origin, a cancel that stops the transfer — and hf-cache blobs are named
from the download's own first answer, without a HEAD. Real servers on loopback, the real
huggingface_hub emulator; app/executor/download.py's download() as the runner calls it."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from app.executor.client import Claimed
from app.executor.curl_lane import CurlLane
from app.executor.curl_outcomes import TransferError
from app.executor.download import Downloaded, Tuning, Upstream, WrongSize, download, in_lane, partial_path
from app.executor.layout import publish
from tests.support.file_server import FileServer, serve_in_thread
from tests.support.hub import git_blob_oid, running_hub

KB = 1024


@pytest.fixture
def files() -> Iterator[FileServer]:
    fs = FileServer()
    fs.start()
    yield fs
    fs.close()


def claimed(path: str, size: int, sha256: str | None = None, repo: str = "org/lane", **extra: Any) -> Claimed:
    return Claimed(f"id-{path.replace('/', '-')}", "acme", repo, "main", path, size, sha256, "tok", 60, **extra)


def fetch(
    storage: Path,
    endpoint: str,
    items: list[Claimed],
    headers: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] = lambda _n: None,
) -> list[Downloaded | BaseException]:
    """download() of every item at once through one lane, each published when it arrives."""
    storage.mkdir(parents=True, exist_ok=True)  # as `dlw executor run` makes its roots at start

    async def run() -> list[Downloaded | BaseException]:
        lane = CurlLane(max_active=4, max_connections=4)
        tuning = Tuning(lane=lane)
        try:
            return await asyncio.gather(
                *(
                    download(
                        [storage],
                        endpoint,
                        item,
                        headers or {},
                        tuning,
                        on_bytes,
                        then=functools.partial(_publish, item),
                    )
                    for item in items
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.to_thread(lane.close)

    return asyncio.run(run())


def test_small_files_arrive_verified_in_place_one_request_each(files: FileServer, work: Path) -> None:
    rng = random.Random(1)
    specs = [
        files.add(work / "served", "org/lane", "main", f"d/f{i}.bin", rng.randbytes(rng.randint(0, 9000)))
        for i in range(40)
    ]
    items = [claimed(s["path"], s["size"], s["sha256"]) for s in specs]
    assert all(in_lane(i) for i in items)
    results = fetch(work / "storage", files.url, items)
    for spec, result in zip(specs, results, strict=True):
        assert isinstance(result, Downloaded), result
        assert result.sha256 == spec["sha256"]
        on_disk = work / "storage" / "acme" / "org/lane" / "main" / spec["path"]
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == spec["sha256"]
        assert files.requests[spec["path"]] == 1
    assert not list((work / "storage").rglob("*.part"))  # every partial file became its file


def test_a_certificate_bundle_under_any_file_name_is_taken(
    files: FileServer, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane hands libcurl the bundle Python's ssl module uses (SSL_CERT_FILE here) as a path
    of bytes: a name that is not ASCII must not stop the files (libcurl's options are bytes)."""
    bundle = work / "certificats-é.pem"
    bundle.write_bytes(b"")  # never read: the files are fetched over http
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    spec = files.add(work / "served", "org/lane", "main", "ca.bin", b"bytes")
    results = fetch(work / "storage", files.url, [claimed(spec["path"], spec["size"], spec["sha256"])])
    assert isinstance(results[0], Downloaded), results[0]


def test_more_bytes_than_declared_stop_the_transfer_and_nothing_past_the_size_is_written(
    files: FileServer, work: Path
) -> None:
    """Announced (a Content-Length above the size: refused before any byte is written) or not (a
    server that just keeps sending): WrongSize, the partial file never above the declared size,
    then removed; the unannounced sender sees the connection close long before its end."""
    content = random.Random(2).randbytes(900 * KB)
    files.add(work / "served", "org/lane", "main", "announced.bin", content)
    hidden, hidden_url = _endless_server(content)
    declared = 100 * KB + 7
    written: dict[str, list[int]] = {"announced.bin": [], "hidden.bin": []}

    def watch(path: str) -> Callable[[int], None]:
        item = claimed(path, declared)

        def after_write(n: int) -> None:
            written[path].append(partial_path([work / "storage"], item).stat().st_size)

        return after_write

    try:
        (announced,) = fetch(
            work / "storage", files.url, [claimed("announced.bin", declared)], on_bytes=watch("announced.bin")
        )
        (unannounced,) = fetch(
            work / "storage", hidden_url, [claimed("hidden.bin", declared)], on_bytes=watch("hidden.bin")
        )
    finally:
        hidden.shutdown()
    for result in (announced, unannounced):
        assert isinstance(result, WrongSize), result
        assert str(result).startswith(f"server sent more than the declared {declared} bytes"), result
    assert written["announced.bin"] == []
    assert written["hidden.bin"] and max(written["hidden.bin"]) <= declared
    assert hidden.sent < len(content)  # type: ignore[attr-defined]
    assert not [p for p in (work / "storage").rglob("*") if p.is_file()]


def test_fewer_bytes_than_declared_fail_the_file(files: FileServer, work: Path) -> None:
    content = random.Random(3).randbytes(5000)
    spec = files.add(work / "served", "org/lane", "main", "short.bin", content)
    (result,) = fetch(work / "storage", files.url, [claimed("short.bin", 5001, spec["sha256"])])
    assert isinstance(result, WrongSize) and "fewer than the declared 5001 bytes" in str(result), result
    assert not [p for p in (work / "storage").rglob("*") if p.is_file()]


def test_an_error_status_comes_back_with_its_retry_after(files: FileServer, work: Path) -> None:
    for name in ("busy.bin", "down.bin", "gone.bin"):
        files.add(work / "served", "org/lane", "main", name, b"x" * 10)
    files.refusals["busy.bin"] = [(429, 7)]
    files.refusals["down.bin"] = [(503, None)]
    files.refusals["gone.bin"] = [(404, None)]
    busy, down, gone = fetch(
        work / "storage", files.url, [claimed(n, 10) for n in ("busy.bin", "down.bin", "gone.bin")]
    )
    assert isinstance(busy, Upstream) and (busy.status, busy.retry_after) == (429, 7.0)
    assert isinstance(down, Upstream) and (down.status, down.retry_after) == (503, None)
    assert isinstance(gone, Upstream) and gone.status == 404


def test_the_token_never_follows_a_redirect_to_another_origin_and_only_http_is_followed(work: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    content = b"redirected bytes"
    cdn, cdn_url = serve_in_thread(_recording(seen, "cdn", lambda h: _send(h, 200, content)))
    other_host = cdn_url.replace("127.0.0.1", "localhost")
    routes = {
        "/org/lane/resolve/main/port.bin": cdn_url + "/blob",  # same host, other port
        "/org/lane/resolve/main/host.bin": other_host + "/blob",
        "/org/lane/resolve/main/ftp.bin": "ftp://127.0.0.1/blob",
        "/org/lane/resolve/main/file.bin": "file:///etc/passwd",
    }
    hub, hub_url = serve_in_thread(_recording(seen, "hub", lambda h: _send(h, 302, b"", Location=routes[h.path])))
    try:
        items = [claimed(n, len(content)) for n in ("port.bin", "host.bin", "ftp.bin", "file.bin")]
        port, host, ftp, file = fetch(work / "storage", hub_url, items, {"Authorization": "Bearer hub-secret"})
    finally:
        cdn.shutdown()
        hub.shutdown()
    assert isinstance(port, Downloaded) and isinstance(host, Downloaded), (port, host)
    assert isinstance(ftp, Upstream) and isinstance(file, Upstream) and ftp.status == file.status == 0
    assert {auth for who, auth in seen if who == "hub"} == {"Bearer hub-secret"}
    (injected,) = fetch(work / "storage", hub_url, [claimed("port.bin", 1)], {"Authorization": "Bearer a\r\nX-Evil: 1"})
    assert isinstance(injected, TransferError) and "line break" in str(injected), injected
    assert [auth for who, auth in seen if who == "cdn"] == [None, None]


def test_a_cancelled_download_stops_and_the_lane_goes_on(files: FileServer, work: Path) -> None:
    slow = random.Random(4).randbytes(400 * KB)
    files.add(work / "served", "org/lane", "main", "slow.bin", slow)
    quick = files.add(work / "served", "org/lane", "main", "quick.bin", b"q" * 3000)
    files.rate["slow.bin"] = 100 * KB  # four seconds in all
    item = claimed("slow.bin", len(slow))
    (work / "storage").mkdir()  # as `dlw executor run` makes its roots at start

    async def run() -> Downloaded:
        lane = CurlLane(max_active=2, max_connections=2)
        tuning = Tuning(lane=lane)
        try:
            job = asyncio.create_task(download([work / "storage"], files.url, item, {}, tuning, lambda _n: None))
            await asyncio.to_thread(_until, lambda: files.sent["slow.bin"] >= 50 * KB)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            return await download(
                [work / "storage"], files.url, claimed("quick.bin", 3000), {}, tuning, lambda _n: None
            )
        finally:
            await asyncio.to_thread(lane.close)

    after = asyncio.run(run())
    assert after.sha256 == quick["sha256"]
    sent = files.sent["slow.bin"]
    threading.Event().wait(0.5)
    assert files.sent["slow.bin"] - sent <= 64 * KB  # stopped (one piece in flight at most)
    assert partial_path([work / "storage"], item).exists()  # kept, as a stopped download is


@pytest.mark.parametrize("lfs_size", [6000, 9 << 20], ids=["small-lane", "large-threaded-ranges"])
def test_hf_cache_blobs_are_named_from_the_first_answer_without_a_head(work: Path, lfs_size: int) -> None:
    """On both byte paths: the lane (small) and the threaded ranges (8 MiB and more)."""
    lfs, plain = random.Random(5).randbytes(lfs_size), b"a small git file\n"
    with running_hub() as hub:
        repo = hub.hub.repo("org/cache")
        commit = repo.commit({"w.bin": lfs, "config.json": plain}, lfs={"w.bin"})
        items = [
            claimed(
                p, len(c), hashlib.sha256(c).hexdigest(), repo="org/cache", commit=commit, storage_layout="hf-cache"
            )
            for p, c in (("w.bin", lfs), ("config.json", plain))
        ]
        assert in_lane(items[0]) == (lfs_size < 8 << 20)
        weights, config = fetch(work / "storage", hub.url, items)
        methods = {method for method, _ in hub.hub.requests}
    assert isinstance(weights, Downloaded) and isinstance(config, Downloaded), (weights, config)
    assert weights.etag == hashlib.sha256(lfs).hexdigest()  # X-Linked-Etag of the hub's redirect
    assert config.etag == git_blob_oid(plain)  # ETag of a file stored in git
    blobs = work / "storage" / "acme" / "models--org--cache" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == sorted([weights.etag, config.etag])
    assert "HEAD" not in methods


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _publish(item: Claimed, result: Downloaded) -> None:
    publish(result.place, item, result.sha256, result.etag)


# -- small servers ---------------------------------------------------------------------------
def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _recording(
    seen: list[tuple[str, str | None]], who: str, answer: Callable[[BaseHTTPRequestHandler], None]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append((who, self.headers.get("Authorization")))
            answer(self)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _endless_server(content: bytes) -> tuple[Any, str]:
    """Sends `content` slowly without a Content-Length (the end is the connection's close);
    `.sent` on the server counts what it wrote."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for at in range(0, len(content), 16 * KB):
                    self.wfile.write(content[at : at + 16 * KB])
                    self.wfile.flush()
                    self.server.sent += 16 * KB  # type: ignore[attr-defined]
                    threading.Event().wait(0.005)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    server, url = serve_in_thread(Handler)
    server.sent = 0  # type: ignore[attr-defined]
    return server, url
