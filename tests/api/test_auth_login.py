"""Login without an identity provider (dev mode) and the callback's error answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.identity import login_state
from tests.support.app import SECRET, app_settings, bearer
from tests.support.database import MigratedDb
from tests.support.jwks_server import JwksServer
from tests.support.tenants import tenant

RULES = (
    '[{"email_domain": "acme.test", "tenant": "acme", "role": "tenant_operator"},'
    ' {"email_domain": "gone.test", "tenant": "no-such-tenant", "role": "tenant_admin"},'
    ' {"email_domain": "sleepy.test", "tenant": "sleepy", "role": "tenant_admin"}]'
)


@pytest.fixture(scope="module")
def acme(db: MigratedDb) -> int:
    with db.owner() as conn:  # a bare inactive tenant row
        conn.execute("INSERT INTO dlw.tenants (slug, display_name, active) VALUES ('sleepy', 'Inactive', false)")
    return tenant(db, "acme", name="Acme")


@pytest.fixture(scope="module")
def dev_client(db: MigratedDb, acme: int) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, auth_dev_mode=True, auth_tenant_rules_json=RULES))) as c:
        yield c


@pytest.fixture(scope="module")
def real_client(db: MigratedDb, acme: int) -> Iterator[TestClient]:
    """Dev mode off, with an issuer that answers discovery but whose token endpoint is dead."""
    idp = JwksServer()
    settings = app_settings(
        db,
        oidc_issuer=idp.issuer,
        oidc_client_id="web",
        oidc_client_secret="s3cret",
        oidc_redirect_url="http://testserver/api/v1/auth/callback",
        auth_tenant_rules_json=RULES,
    )
    with TestClient(create_app(settings)) as c:
        yield c
    idp.close()


def audit_rows(db: MigratedDb, action: str) -> list[tuple[object, ...]]:
    with db.owner() as conn:
        return conn.execute(
            "SELECT tenant_id, actor, detail FROM dlw.audit_log WHERE action = %s ORDER BY at", (action,)
        ).fetchall()


def test_dev_login_places_a_new_user_by_rule_and_keeps_them(dev_client: TestClient, db: MigratedDb, acme: int):
    first = dev_client.get("/api/v1/auth/login", params={"email": "alice@acme.test"}, follow_redirects=False)
    assert first.status_code == 302
    assert first.headers["location"].startswith("/api/v1/auth/callback?code=dev%3Aalice%40acme.test")
    result = dev_client.get(first.headers["location"])
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["tenant_id"] == acme and body["role"] == "tenant_operator" and body["expires_in"] == 3600
    me = dev_client.get("/api/v1/auth/me", headers=bearer(body["system_jwt"])).json()
    assert me["tenant_id"] == acme and me["role"] == "tenant_operator" and me["is_service"] is False

    # A returning user keeps tenant and role even if an admin changed the role since.
    with db.owner() as conn:
        conn.execute("UPDATE dlw.users SET role = 'tenant_admin' WHERE subject = 'alice@acme.test'")
    again = dev_client.get("/api/v1/auth/login", params={"email": "alice@acme.test"}).json()
    assert again["role"] == "tenant_admin"
    assert dev_client.get("/api/v1/auth/me", headers=bearer(again["system_jwt"])).json()["user_id"] == me["user_id"]
    logins = [r for r in audit_rows(db, "auth.login") if r[1] == "oidc:dev#alice@acme.test"]
    assert [r[2]["first_login"] for r in logins] == [True, False]


@pytest.mark.parametrize("email", ["mallory@unknown.test", "bob@gone.test", "carol@sleepy.test"])
def test_unresolved_tenant_is_403_and_audited(dev_client: TestClient, db: MigratedDb, email: str):
    response = dev_client.get("/api/v1/auth/login", params={"email": email})
    assert response.status_code == 403
    assert response.json()["detail"]["code"] == "TENANT_UNRESOLVED"
    denied = [r for r in audit_rows(db, "auth.login_denied") if r[1] == f"oidc:dev#{email}"]
    assert len(denied) == 1 and denied[0][0] == 1 and denied[0][2]["reason"] == "TENANT_UNRESOLVED"


def test_a_user_of_a_deactivated_tenant_cannot_log_in(dev_client: TestClient, db: MigratedDb, acme: int):
    assert dev_client.get("/api/v1/auth/login", params={"email": "dave@acme.test"}).status_code == 200
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tenants SET active = false WHERE tenant_id = %s", (acme,))
    try:
        response = dev_client.get("/api/v1/auth/login", params={"email": "dave@acme.test"})
        assert response.status_code == 403 and response.json()["detail"]["code"] == "TENANT_INACTIVE"
    finally:
        with db.owner() as conn:
            conn.execute("UPDATE dlw.tenants SET active = true WHERE tenant_id = %s", (acme,))


def test_dev_codes_are_rejected_when_dev_mode_is_off(real_client: TestClient):
    real_client.cookies.clear()
    response = real_client.get("/api/v1/auth/callback", params={"code": "dev:alice@acme.test", "state": "x"})
    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "OIDC_INVALID_CODE"


def test_real_login_redirects_to_the_provider_with_pkce_state_and_nonce(real_client: TestClient):
    response = real_client.get("/api/v1/auth/login", follow_redirects=False)
    assert response.status_code == 302
    location = response.headers["location"]
    for part in (
        "response_type=code",
        "client_id=web",
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "scope=openid+email+profile",
    ):
        assert part in location, part
    cookie = response.headers["set-cookie"]
    assert "dlw_login=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Path=/api/v1/auth" in cookie


@pytest.mark.parametrize("state", [None, "wrong-state"])
def test_callback_with_missing_or_wrong_state_is_400(real_client: TestClient, state: str | None):
    real_client.cookies.clear()
    real_client.get("/api/v1/auth/login", follow_redirects=False)
    params = {"code": "abc"} | ({"state": state} if state else {})
    response = real_client.get("/api/v1/auth/callback", params=params)
    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "OIDC_STATE_MISMATCH"


def test_callback_without_the_login_cookie_is_400(real_client: TestClient):
    real_client.cookies.clear()
    response = real_client.get("/api/v1/auth/callback", params={"code": "abc", "state": "s"})
    assert response.status_code == 400 and response.json()["detail"]["code"] == "OIDC_STATE_MISMATCH"


def test_callback_when_the_provider_is_unreachable_is_503(real_client: TestClient):
    """Discovery answered at login; the token endpoint (nothing listens there) does not."""
    real_client.cookies.clear()
    real_client.get("/api/v1/auth/login", follow_redirects=False)
    cookie = real_client.cookies.get(login_state.COOKIE)
    saved = login_state.unseal(SECRET, cookie)
    assert saved is not None
    response = real_client.get("/api/v1/auth/callback", params={"code": "abc", "state": saved.state})
    assert response.status_code == 503
    assert response.json()["detail"]["code"] == "OIDC_UPSTREAM"
    assert response.headers["retry-after"]


def test_login_when_discovery_is_unreachable_is_503(db: MigratedDb):
    settings = app_settings(
        db, oidc_client_id="web", oidc_client_secret="s", oidc_redirect_url="http://testserver/api/v1/auth/callback"
    )
    with TestClient(create_app(settings)) as c:
        response = c.get("/api/v1/auth/login", follow_redirects=False)
        assert response.status_code == 503 and response.json()["detail"]["code"] == "OIDC_UPSTREAM"


def test_provider_error_on_the_callback_is_400(real_client: TestClient):
    response = real_client.get("/api/v1/auth/callback", params={"error": "access_denied", "state": "x"})
    assert response.status_code == 400 and response.json()["detail"]["code"] == "OIDC_PROVIDER_ERROR"
