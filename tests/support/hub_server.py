"""A minimal Hugging Face-compatible file server for the end-to-end download tests (generated
files with known sha256, optionally slow or without Content-Length), with the `hub` fixture and
the `api` fixture those modules share (a real `dlw serve` folding usage every second).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

import pytest

from tests.support import server
from tests.support.database import MigratedDb
from tests.support.file_server import serve_in_thread
from tests.support.tenants import tenant

CHUNK = 64 * 1024


@dataclass
class HubServer:
    """Serves {repo_id}/resolve/{revision}/{path} like the Hugging Face hub; counts requests and
    the bytes sent per path; `slow[path]` seconds of sleep between 64 KiB chunks; paths in
    `unannounced` are sent without Content-Length (the body ends when the connection closes)."""

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    unannounced: set[str] = field(default_factory=set)
    requests: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)

    def add(self, repo: str, revision: str, path: str, content: bytes) -> dict[str, Any]:
        self.files[(repo, revision, path)] = content
        return {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = self.path.split("?", 1)[0].split("/")
                # /{org}/{name}/resolve/{revision}/{path...}
                if len(parts) < 6 or parts[3] != "resolve":
                    self.send_error(404)
                    return
                repo, revision, path = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
                content = hub.files.get((repo, revision, path))
                hub.requests[path] += 1
                if content is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if path in hub.unannounced:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                try:
                    for offset in range(0, len(content), CHUNK):
                        self.wfile.write(content[offset : offset + CHUNK])
                        self.wfile.flush()
                        hub.sent[path] += len(content[offset : offset + CHUNK])
                        if path in hub.slow:
                            time.sleep(hub.slow[path])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    h = HubServer()
    h.start()
    yield h
    h.close()


@pytest.fixture(scope="module")
def api(db: MigratedDb) -> Iterator[str]:
    """A real `dlw serve` folding usage every second (overrides tests/e2e/conftest.py's `api`,
    which resolves tasks at a hub emulator)."""
    with server.running_server(db, DLW_SNAPSHOT_INTERVAL_SECONDS="1") as url:
        yield url


def provision(db: MigratedDb, slug: str, bytes_month: int = 0) -> int:
    return tenant(db, slug, concurrent=0, bytes_month=bytes_month, storage_gb=0)
