"""Building the real app for tests: secure settings, tokens, and clients."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from app.identity import system_jwt
from app.identity.principal import Principal
from tests.support.database import MigratedDb

SECRET = "test-system-jwt-secret-0123456789abcdef"  # >= 32 bytes, as the startup guard demands
ADMIN_TOKEN = "test-service-token-0123456789abcdefghij"
SECRET_KEY = "test-hub-token-encryption-key-0123456789"  # DLW_SECRET_KEY, >= 32 bytes
UNUSED_ISSUER = "http://127.0.0.1:9/no-provider"  # the discard port: nothing answers


def app_settings(db: MigratedDb, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db.app_url,
        "system_jwt_secret": SECRET,
        "system_admin_token": ADMIN_TOKEN,
        "oidc_issuer": UNUSED_ISSUER,
        "secret_key": SECRET_KEY,
        "hf_endpoint": "",  # no hub unless a test brings one (tests/support/hub): manifests unchecked
        "db_pool_min_size": 1,
        "db_pool_max_size": 4,
    }
    values.update(overrides)
    return Settings(**values)


def token(tenant_id: int, role: str, user_id: str = "test-user", ttl: int = 600) -> str:
    return system_jwt.issue(SECRET, Principal(user_id=user_id, tenant_id=tenant_id, role=role), ttl)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def every_page(client: TestClient, path: str, headers: dict[str, str], params: dict[str, Any]) -> list[dict[str, Any]]:
    """The items of every page of a cursor-paged list, following next_cursor to the end."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(path, headers=headers, params=params | ({"cursor": cursor} if cursor else {})).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def detail(response: Any) -> dict[str, Any]:
    """An error answer's detail without its human message (asserted separately by the shape test)."""
    body: dict[str, Any] = response.json()["detail"]
    return {key: value for key, value in body.items() if key != "message"}
