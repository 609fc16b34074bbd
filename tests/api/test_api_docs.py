"""DLW_API_DOCS: who may read /openapi.json, /docs and /redoc (app/api/api_docs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import ADMIN_TOKEN, app_settings, bearer
from tests.support.database import MigratedDb

DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


@contextmanager
def client_with(db: MigratedDb, **overrides: Any) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, **overrides))) as c:
        yield c


@pytest.mark.parametrize("overrides", [{}, {"api_docs": "authenticated"}], ids=["default", "authenticated"])
def test_outside_dev_mode_the_docs_need_a_token(db: MigratedDb, overrides: dict[str, Any]):
    with client_with(db, **overrides) as c:
        for path in DOC_PATHS:
            refused = c.get(path)
            assert refused.status_code == 401, path
            assert refused.json()["detail"]["code"] == "UNAUTHENTICATED"
            assert c.get(path, headers=bearer("not-a-token")).status_code == 401, path
            assert c.get(path, headers=bearer(ADMIN_TOKEN)).status_code == 200, path
        assert "/api/v1/tasks" in c.get("/openapi.json", headers=bearer(ADMIN_TOKEN)).json()["paths"]
        # The vendors' script files stay public: they say nothing about this deployment.
        assert c.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


@pytest.mark.parametrize("overrides", [{"auth_dev_mode": True}, {"api_docs": "public"}], ids=["dev", "public"])
def test_public_docs_need_no_token(db: MigratedDb, overrides: dict[str, Any]):
    with client_with(db, **overrides) as c:
        for path in DOC_PATHS:
            assert c.get(path).status_code == 200, path
        assert "/api/v1/tasks" in c.get("/openapi.json").json()["paths"]


def test_off_removes_the_docs_even_in_dev_mode(db: MigratedDb):
    with client_with(db, api_docs="off", auth_dev_mode=True) as c:
        for path in (*DOC_PATHS, "/docs-assets/swagger-ui-bundle.js"):
            assert c.get(path, headers=bearer(ADMIN_TOKEN)).status_code == 404, path


def test_the_pages_load_only_local_assets(db: MigratedDb):
    with client_with(db, api_docs="public") as c:
        for path in ("/docs", "/redoc"):
            page = c.get(path).text
            assert "http://" not in page and "https://" not in page, page
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
            assert c.get(f"/docs-assets/{asset}").status_code == 200, asset
