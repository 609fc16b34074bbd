"""Unexpected failures never reach the client as a stack trace or a library message."""

from __future__ import annotations

from fastapi import Request
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.api.transaction import request_transaction
from app.identity.principal import Principal
from tests.support.app import app_settings
from tests.support.database import MigratedDb


def test_failures_are_answered_with_stable_codes(db: MigratedDb):
    app = create_app(app_settings(db))

    @app.get("/test/forgot-its-permission-check")
    async def forgot(request: Request) -> None:
        # A (buggy) route that skipped require_perm and lets a viewer write: RLS refuses.
        async with request_transaction(request, Principal(user_id="v", tenant_id=1, role="tenant_viewer")) as conn:
            await conn.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (1, 'sneaky')")

    @app.get("/test/bug")
    async def bug() -> None:
        raise ValueError("internal detail that must not leak")

    @app.get("/test/db-down")
    async def db_down() -> None:
        raise ConnectionRefusedError("connection refused by 10.0.0.1")

    with TestClient(app, raise_server_exceptions=False) as client:
        refused = client.get("/test/forgot-its-permission-check")
        assert refused.status_code == 403 and refused.json()["detail"]["code"] == "DB_FORBIDDEN"
        bug = client.get("/test/bug")
        assert bug.status_code == 500 and bug.json()["detail"]["code"] == "INTERNAL_ERROR"
        assert "internal detail" not in bug.text and "Traceback" not in bug.text
        down = client.get("/test/db-down")
        assert down.status_code == 503 and down.json()["detail"]["code"] == "DB_UNAVAILABLE"
        assert "10.0.0.1" not in down.text
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.storage_targets WHERE name = 'sneaky'").fetchone() == (0,)
