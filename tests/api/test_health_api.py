"""The API's health endpoints and its refusal to run with an RLS-defeating database role."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.factory import StartupRefused, create_app
from app.config import Settings
from tests.support.app import app_settings
from tests.support.database import MigratedDb


def settings_for(db: MigratedDb, url: str | None = None, **extra: object) -> Settings:
    return app_settings(db, database_url=url or db.app_url, **extra)


def test_healthz_and_readyz_on_a_migrated_database(db: MigratedDb):
    with TestClient(create_app(settings_for(db))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready"}


def test_readyz_reports_a_schema_that_does_not_match_the_code(db: MigratedDb):
    with db.owner() as conn:
        conn.execute("UPDATE dlw.schema_program SET program_sha256 = 'stale'")
    try:
        with TestClient(create_app(settings_for(db))) as client:
            response = client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["detail"]["code"] == "NOT_MIGRATED"
            assert client.get("/healthz").status_code == 200
    finally:
        from app.ops.migrate import migrate

        migrate(db.owner_url, force_program=True)


def test_the_api_refuses_a_superuser_connection_outside_dev_mode(db: MigratedDb):
    app = create_app(settings_for(db, db.owner_url))
    with pytest.raises(StartupRefused, match="superuser"), TestClient(app):
        pass


def test_dev_mode_warns_about_an_unsafe_role_but_starts(db: MigratedDb):
    with TestClient(create_app(settings_for(db, db.owner_url, auth_dev_mode=True))) as client:
        assert client.get("/healthz").status_code == 200
