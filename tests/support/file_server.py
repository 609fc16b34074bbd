"""A file endpoint for executor tests and benchmarks: serves {repo}/resolve/{revision}/{path}
from memory or disk with HTTP Range (206, Content-Range), counts the requests, ranges and bytes
it sends per path (with when each request came), can throttle (bytes per second) or corrupt the
bytes of ranged answers, and can refuse a path first (503/429 with a Retry-After, as a hub does).
Large files are sent with sendfile(2), so the server is not what a benchmark measures."""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
PIECE = 64 * 1024


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: eight clients connecting at once (curl
    # --parallel-max 8, an executor's eight slots) overflow it, and a dropped SYN is retried only
    # after a second. A real file endpoint accepts them.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that was killed (the resume tests and bench SIGKILL executors) resets its
        # connections: that is expected, not a trace on stderr. Anything else still is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server on a free port of 127.0.0.1, run by a daemon thread; and its URL."""
    httpd = _Server(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@dataclass
class FileServer:
    files: dict[str, Path] = field(default_factory=dict)  # "{repo}/{revision}/{path}" -> file on disk
    rate: dict[str, float] = field(default_factory=dict)  # path -> bytes per second
    corrupt_ranges: set[str] = field(default_factory=set)  # paths whose ranged answers (start > 0) lie
    refusals: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)  # path -> (status, Retry-After)
    requests: Counter[str] = field(default_factory=Counter)
    request_times: dict[str, list[float]] = field(default_factory=dict)  # path -> time.monotonic() of each
    ranged: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, root: Path, repo: str, revision: str, path: str, content: bytes) -> dict[str, Any]:
        """Store content under root and serve it; returns the manifest entry of the file."""
        disk = root / repo / revision / path
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_bytes(content)
        self.files[f"{repo}/{revision}/{path}"] = disk
        return {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body are two writes: without TCP_NODELAY a keep-alive answer waits for
            # the client's delayed ACK (40 ms a file), which no real file endpoint does.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                parts = self.path.split("?", 1)[0].split("/")
                if len(parts) < 6 or parts[3] != "resolve":
                    self.send_error(404)
                    return
                path = unquote("/".join(parts[5:]))
                disk = server.files.get(f"{parts[1]}/{parts[2]}/{unquote(parts[4])}/{path}")
                with server.lock:
                    server.requests[path] += 1
                    server.request_times.setdefault(path, []).append(time.monotonic())
                    queued = server.refusals.get(path)
                    refusal = queued.pop(0) if queued else None
                if disk is None:
                    self.send_error(404)
                    return
                if refusal is not None:  # the next queued refusal for this path, once
                    status, retry_after = refusal
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.serve(self, path, disk)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_in_thread(Handler)
        return self.url

    def serve(self, handler: BaseHTTPRequestHandler, path: str, disk: Path) -> None:
        size = disk.stat().st_size
        start, end = 0, size - 1
        match = _RANGE.match(handler.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
            if start > end:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{size}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            with self.lock:
                self.ranged[path] += 1
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            handler.send_response(200)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(end - start + 1))
        handler.end_headers()
        handler.wfile.flush()
        try:
            with disk.open("rb") as f:
                if path in self.rate or (path in self.corrupt_ranges and start):
                    self._send_slowly(handler, path, f, start, end, corrupt=path in self.corrupt_ranges and start > 0)
                else:
                    sent = handler.connection.sendfile(f, start, end - start + 1)
                    with self.lock:
                        self.sent[path] += sent
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_slowly(
        self, handler: BaseHTTPRequestHandler, path: str, f: Any, start: int, end: int, *, corrupt: bool
    ) -> None:
        rate = self.rate.get(path)
        f.seek(start)
        left = end - start + 1
        began = time.monotonic()
        done = 0
        while left > 0:
            piece = bytearray(f.read(min(PIECE, left)))
            if corrupt and done == 0:
                piece[0] ^= 0xFF  # one flipped byte at the start of every ranged answer
            handler.wfile.write(piece)
            handler.wfile.flush()
            left -= len(piece)
            done += len(piece)
            with self.lock:
                self.sent[path] += len(piece)
            if rate:
                ahead = done / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def served_bytes(server: FileServer, path: str) -> int:
    with server.lock:
        return server.sent[path]
