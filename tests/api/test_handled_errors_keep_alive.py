"""A handled error is one log line and leaves the keep-alive connection usable.

Starlette's catch-all re-raises after answering; uvicorn then logs "Exception in ASGI
application" with a traceback and closes the connection. Checked on one socket: an answered
error, then another request on the same socket."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from psycopg import sql

from app.api.factory import create_app
from tests.support import server
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb, free_port
from tests.support.tenants import tenant

TERMINATE = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE application_name = 'dlw-api' AND datname = current_database()"
)


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_a_database_503_keeps_the_connection_and_logs_no_traceback(db: MigratedDb, tmp_path: Path):
    tid = tenant(db, "keepalive")
    headers = bearer(token(tid, "tenant_viewer"))
    log = tmp_path / "server.log"
    limit = sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}")
    with server.running_server(db, log=log) as base:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        assert _get(conn, "/api/v1/quota/current", headers)[0] == 200
        sock = conn.sock
        try:
            # The API's role may not connect any more, and its pooled connections are gone.
            db.server.execute(limit.format(sql.Identifier(db.name), sql.Literal(0)))
            with db.owner() as owner:
                owner.execute(TERMINATE)
            status, answer_headers, body = _get(conn, "/api/v1/quota/current", headers)
        finally:
            db.server.execute(limit.format(sql.Identifier(db.name), sql.Literal(-1)))
        assert status == 503 and json.loads(body)["detail"]["code"] == "DB_UNAVAILABLE"
        assert answer_headers.get("retry-after") and answer_headers.get("connection") != "close"
        assert _get(conn, "/api/v1/quota/current", headers)[0] == 200
        assert conn.sock is sock, "the server closed the keep-alive connection after the handled error"
        conn.close()
    server_log = log.read_text()
    assert "Traceback" not in server_log and "Exception in ASGI application" not in server_log, server_log
    assert server_log.count("database answered 503 DB_UNAVAILABLE") == 1, server_log


@contextmanager
def _uvicorn(app: object) -> Iterator[int]:
    """The app under a real uvicorn server in a thread (its log reaches caplog)."""
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))  # type: ignore[arg-type]
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        instance.should_exit = True
        thread.join(30)


def test_the_catch_all_answers_once_and_keeps_the_connection(db: MigratedDb, caplog: pytest.LogCaptureFixture):
    app = create_app(app_settings(db))

    @app.get("/test-only/bug")
    async def bug() -> None:  # a route with a bug: nothing handles RuntimeError but the catch-all
        raise RuntimeError("a bug")

    caplog.set_level(logging.INFO)
    with _uvicorn(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status, answer_headers, body = _get(conn, "/test-only/bug", {})
        sock = conn.sock
        assert status == 500 and json.loads(body) == {
            "detail": {"code": "INTERNAL_ERROR", "message": "an unexpected failure (logged, never described)"}
        }
        assert answer_headers.get("connection") != "close"
        assert _get(conn, "/healthz", {})[0] == 200
        assert conn.sock is sock
        conn.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["unhandled error on GET /test-only/bug"]
    assert "Exception in ASGI application" not in caplog.text
