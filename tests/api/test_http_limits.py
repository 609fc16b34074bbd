"""Slow and oversized clients against a real `dlw serve` (real sockets): connections that never
finish their headers are closed within a bound derived from DLW_HTTP_HEADER_TIMEOUT_SECONDS,
oversized headers are 431, a body over DLW_HTTP_MAX_BODY_BYTES is 413 whether it declares its
length or is chunked; every refusal in the one error shape."""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import server
from tests.support.app import bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

HEADER_TIMEOUT = 3.0
MAX_BODY = 1024 * 1024
SLOW = 500
TRICKLING = 5


@pytest.fixture(scope="module")
def base(db: MigratedDb) -> Iterator[str]:
    with server.running_server(
        db, DLW_HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT), DLW_HTTP_MAX_BODY_BYTES=str(MAX_BODY)
    ) as url:
        yield url


def _address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def _answer(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _exchange(base: str, request: bytes) -> bytes:
    """Send a raw request (the server may refuse before it is all sent) and read to EOF."""
    with socket.create_connection(_address(base), timeout=30) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-way: the answer was written before the close
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_connections_that_never_finish_their_headers_are_closed_in_time(base: str):
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    trickling: list[socket.socket] = []
    for i in range(SLOW + TRICKLING):
        sock = socket.create_connection(_address(base), timeout=30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dlw\r\n")  # and never the blank line
        sock.setblocking(False)
        opened[sock] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)
        if i >= SLOW:
            trickling.append(sock)  # these keep sending a header byte every 0.5 s
    # While they hang, the server serves others.
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    received: dict[socket.socket, bytes] = {s: b"" for s in opened}
    closed: dict[socket.socket, float] = {}
    deadline = max(opened.values()) + 3 * HEADER_TIMEOUT
    next_trickle = time.monotonic()
    while len(closed) < len(opened) and time.monotonic() < deadline:
        if time.monotonic() >= next_trickle:
            for sock in trickling:
                if sock not in closed:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
            next_trickle += 0.5
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            received[sock] += chunk
            if not chunk:
                closed[sock] = time.monotonic()
                selector.unregister(sock)
    for sock in opened:
        sock.close()
    waited = sorted(closed[s] - opened[s] for s in closed)
    print(
        f"\nslow clients: {len(closed)}/{len(opened)} closed; after {waited[0]:.2f} to {waited[-1]:.2f} s"
        f" (header timeout {HEADER_TIMEOUT} s)"
    )
    assert len(closed) == len(opened), f"{len(opened) - len(closed)} connections still open"
    # Closed by the header timer: not before it, and within twice its setting.
    assert waited[0] >= 0.9 * HEADER_TIMEOUT and waited[-1] <= 2 * HEADER_TIMEOUT
    answered = [_answer(received[s]) for s in opened if received[s]]
    assert len(answered) >= SLOW  # the trickling ones may be reset while still sending
    assert all(status == 408 and body["detail"]["code"] == "HEADER_TIMEOUT" for status, body in answered)  # type: ignore[index]


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n", b"".join(b"X-H%d: v\r\n" % i for i in range(5000))],
    ids=["1MB-header", "5000-headers"],
)
def test_oversized_headers_are_refused_431(base: str, headers: bytes):
    data = _exchange(base, b"GET /healthz HTTP/1.1\r\nHost: dlw\r\n" + headers + b"\r\n")
    status, body = _answer(data)
    assert status == 431 and body["detail"]["code"] == "HEADERS_TOO_LARGE"  # type: ignore[index]
    assert b"healthz" not in data and b'"ok"' not in data  # the request never reached the app
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


def test_malformed_requests_are_400_in_the_one_shape(base: str):
    status, body = _answer(_exchange(base, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and body["detail"]["code"] == "MALFORMED_REQUEST"  # type: ignore[index]


def test_bodies_over_the_limit_are_413_chunked_or_not(base: str, db: MigratedDb):
    headers = {**bearer(token(tenant(db, "big-bodies"), "tenant_operator")), "Content-Type": "application/json"}
    oversized = b'{"files": "' + b"a" * MAX_BODY + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(oversized), 65536):
            yield oversized[start : start + 65536]

    with httpx.Client(base_url=base, timeout=60) as http:
        declared = http.post("/api/v1/tasks", headers=headers, content=oversized)
        chunked = http.post("/api/v1/tasks", headers=headers, content=chunks())
        fits = http.post("/api/v1/tasks", headers=headers, content=b'{"files": []}')
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["detail"]["code"] == "BODY_TOO_LARGE"
    assert fits.status_code == 422  # under the limit the body is read and validated
