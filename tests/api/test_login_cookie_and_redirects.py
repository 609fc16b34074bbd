"""What the API reveals without being asked: the login cookie (encrypted, so its state, nonce
and PKCE verifier cannot be read; still refused when changed or expired) and the Host header
(never reflected into a Location: a trailing slash is no route, not a redirect)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import OctKey

from app.api.factory import create_app
from app.identity import login_state
from tests.support.app import ADMIN_TOKEN, SECRET, app_settings, bearer
from tests.support.database import MigratedDb
from tests.support.jwks_server import JwksServer
from tests.support.server import running_server

CALLBACK = "http://testserver/api/v1/auth/callback"


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    """Dev mode off, with an issuer that answers discovery but whose token endpoint is dead:
    a callback that gets past the cookie check answers 503, one that does not, 400."""
    idp = JwksServer()
    settings = app_settings(
        db, oidc_issuer=idp.issuer, oidc_client_id="web", oidc_client_secret="s3cret", oidc_redirect_url=CALLBACK
    )
    with TestClient(create_app(settings)) as c:
        yield c
    idp.close()


def start_login(client: TestClient) -> tuple[str, dict[str, str]]:
    """Our /auth/login: the cookie it sets and the query of the provider URL it redirects to."""
    client.cookies.clear()
    response = client.get("/api/v1/auth/login", follow_redirects=False)
    assert response.status_code == 302
    query = {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}
    return client.cookies[login_state.COOKIE], query


def callback_with(client: TestClient, cookie: str, state: str) -> httpx.Response:
    client.cookies.clear()
    client.cookies.set(login_state.COOKIE, cookie, path=login_state.COOKIE_PATH)
    return client.get("/api/v1/auth/callback", params={"code": "abc", "state": state})


def readable_parts(cookie: str) -> bytes:
    """Everything a reader of the cookie can decode: each dot-separated part, base64url-decoded."""
    out = [cookie.encode()]
    for part in cookie.split("."):
        try:
            out.append(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except (binascii.Error, ValueError):
            pass
    return b"\n".join(out)


def test_the_login_cookie_reveals_neither_state_nor_nonce_nor_verifier(client: TestClient):
    cookie, query = start_login(client)
    saved = login_state.unseal(SECRET, cookie)
    assert saved is not None and saved.state == query["state"] and saved.nonce == query["nonce"]
    visible = readable_parts(cookie)
    for secret in (saved.state, saved.nonce, saved.code_verifier):
        assert secret.encode() not in visible
    assert cookie.count(".") == 4, "a compact JWE: header, (no) key, iv, ciphertext, tag"
    # It is the one that works: with it the callback reaches the (dead) token endpoint.
    assert callback_with(client, cookie, saved.state).status_code == 503


def test_a_changed_cookie_is_refused(client: TestClient):
    cookie, query = start_login(client)
    header, key, iv, ciphertext, tag = cookie.split(".")
    flipped = ("B" if ciphertext[5] == "A" else "A").join((ciphertext[:5], ciphertext[6:]))
    for forged in (
        ".".join((header, key, iv, flipped, tag)),
        ".".join((header, key, iv, ciphertext, tag[::-1])),
        login_state.seal("another-secret", login_state.LoginState(query["state"], "n", "v")),
    ):
        response = callback_with(client, forged, query["state"])
        assert response.status_code == 400 and response.json()["detail"]["code"] == "OIDC_STATE_MISMATCH"


def test_an_expired_cookie_is_refused(client: TestClient):
    state = login_state.LoginState("the-state", "the-nonce", "the-verifier")
    old = login_state.seal(SECRET, state, now=int(time.time()) - login_state.MAX_AGE - 60)
    assert login_state.unseal(SECRET, old) is None
    response = callback_with(client, old, "the-state")
    assert response.status_code == 400 and response.json()["detail"]["code"] == "OIDC_STATE_MISMATCH"
    fresh = login_state.seal(SECRET, state)
    assert callback_with(client, fresh, "the-state").status_code == 503


def test_the_old_signed_but_readable_cookie_is_refused(client: TestClient):
    """The format before encryption: an HS256 JWS whose payload anyone could read."""
    key = OctKey.import_key(hashlib.sha256(b"dlw-login-state\0" + SECRET.encode()).digest())
    now = int(time.time())
    claims = {"st": "s", "nc": "n", "cv": "v", "iat": now, "exp": now + 600}
    signed = jwt.encode({"alg": "HS256", "typ": "dlw-login"}, claims, key, algorithms=["HS256"])
    assert login_state.unseal(SECRET, signed) is None
    assert callback_with(client, signed, "s").status_code == 400


HOSTILE = [
    {"Host": "evil.example"},
    {"X-Forwarded-Host": "evil.example"},
    {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"},
]
PATHS = ["/api/v1/tasks/", "/api/v1/auth/me/", "/api/v1/quota/current/", "/healthz/"]


@pytest.mark.parametrize("headers", HOSTILE)
@pytest.mark.parametrize("path", PATHS)
def test_a_trailing_slash_is_no_route_and_no_redirect(client: TestClient, path: str, headers: dict[str, str]):
    response = client.get(path, headers=headers | bearer(ADMIN_TOKEN), follow_redirects=False)
    assert response.status_code == 404, response.headers
    assert response.json()["detail"]["code"] == "ROUTE_NOT_FOUND"
    assert "location" not in response.headers
    assert "evil" not in str(response.headers).lower() + response.text
    # The path without the slash is the route.
    assert client.get(path.rstrip("/"), headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_the_routers_own_refusals_have_the_api_shape(client: TestClient):
    unknown = client.get("/api/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "ROUTE_NOT_FOUND"
    wrong_method = client.delete("/healthz")
    assert wrong_method.status_code == 405 and wrong_method.json()["detail"]["code"] == "METHOD_NOT_ALLOWED"
    assert wrong_method.headers["allow"] == "GET"
    # The routes' own refusals keep their codes (and headers).
    me = client.get("/api/v1/auth/me")
    assert me.status_code == 401 and me.json()["detail"]["code"] == "UNAUTHENTICATED"
    assert me.headers["www-authenticate"] == "Bearer"


def test_a_real_server_reflects_no_host_header(db: MigratedDb):
    """Through uvicorn, which trusts X-Forwarded-* from 127.0.0.1 by default."""
    with running_server(db) as base, httpx.Client(base_url=base, trust_env=False) as http:
        for headers in HOSTILE:
            response = http.get("/api/v1/tasks/", headers=headers | bearer(ADMIN_TOKEN), follow_redirects=False)
            assert response.status_code == 404 and "location" not in response.headers, response.headers
            assert "evil" not in str(response.headers).lower() + response.text
