"""End to end against a real OpenID provider (the npm package oidc-provider, pinned in
tests/oidc_provider and installed by `./run test`): people log in through it, machines use
its client-credentials tokens, and it rotates its signing keys under our feet."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.identity import login_state
from tests.support.app import SECRET, app_settings, bearer
from tests.support.database import MigratedDb
from tests.support.oidc import (
    OidcProvider,
    client_credentials_token,
    complete_login,
    node_available,
    start_oidc_provider,
)
from tests.support.requirements import require
from tests.support.tenants import dba_login

WEB_CLIENT, WEB_SECRET = "dlw-web", "webSecret0123456789"
M2M_CLIENT, M2M_SECRET = "dlw-m2m", "m2mSecret0123456789"
AUDIENCE = "dlw-api"
REDIRECT = "http://testserver/api/v1/auth/callback"
RULES = (
    '[{"group": "acme-admins", "tenant": "acme", "role": "tenant_admin"},'
    ' {"email_domain": "acme.test", "tenant": "acme", "role": "tenant_viewer"}]'
)


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    require(node_available(), "the OpenID provider end-to-end tests")
    with start_oidc_provider(
        client_id=WEB_CLIENT,
        client_secret=WEB_SECRET,
        redirect_uris=[REDIRECT],
        m2m_client_id=M2M_CLIENT,
        m2m_client_secret=M2M_SECRET,
        audience=AUDIENCE,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def acme(db: MigratedDb) -> int:
    with db.owner() as conn:
        return int(conn.execute("SELECT dlw.provision_tenant('acme', 'Acme')").fetchone()[0])


@pytest.fixture(scope="module")
def app_client(db: MigratedDb, provider: OidcProvider, acme: int) -> Iterator[TestClient]:
    settings = app_settings(
        db,
        oidc_issuer=provider.issuer,
        oidc_client_id=WEB_CLIENT,
        oidc_client_secret=WEB_SECRET,
        oidc_redirect_url=REDIRECT,
        oidc_audience=AUDIENCE,
        auth_tenant_rules_json=RULES,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def login(
    app_client: TestClient,
    email: str,
    groups: list[str] | None = None,
    tamper_nonce: bool = False,
    *,
    claimed_email: str | None = None,
    email_verified: bool = True,
) -> httpx.Response:
    """Drive the whole browser flow: our login -> provider login form -> our callback."""
    app_client.cookies.clear()
    start = app_client.get("/api/v1/auth/login", follow_redirects=False)
    assert start.status_code == 302, start.text
    if tamper_nonce:
        saved = login_state.unseal(SECRET, app_client.cookies[login_state.COOKIE])
        assert saved is not None
        forged = login_state.LoginState(saved.state, "not-the-nonce-we-sent", saved.code_verifier)
        app_client.cookies.set(login_state.COOKIE, login_state.seal(SECRET, forged), path=login_state.COOKIE_PATH)
    with httpx.Client(timeout=20) as browser:
        back = complete_login(
            browser,
            start.headers["location"],
            email,
            groups,
            claimed_email=claimed_email,
            email_verified=email_verified,
        )
    assert back.startswith(REDIRECT + "?"), back
    return app_client.get("/api/v1/auth/callback?" + back.split("?", 1)[1])


def test_login_through_the_provider_yields_a_system_jwt(
    app_client: TestClient, acme: int, db: MigratedDb, provider: OidcProvider
):
    response = login(app_client, "ann@acme.test", ["acme-admins"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tenant_id"] == acme and body["role"] == "tenant_admin"
    me = app_client.get("/api/v1/auth/me", headers=bearer(body["system_jwt"])).json()
    assert me["tenant_id"] == acme and me["role"] == "tenant_admin" and me["is_service"] is False
    with db.owner() as conn:
        assert conn.execute("SELECT issuer, email FROM dlw.users WHERE subject = 'ann@acme.test'").fetchone() == (
            provider.issuer,
            "ann@acme.test",
        )


def test_the_email_rule_applies_when_no_group_matches(app_client: TestClient):
    response = login(app_client, "ben@acme.test")
    assert response.status_code == 200 and response.json()["role"] == "tenant_viewer"


def test_an_identity_no_rule_admits_is_refused_and_audited(app_client: TestClient, db: MigratedDb):
    response = login(app_client, "eve@elsewhere.test")
    assert response.status_code == 403 and response.json()["detail"]["code"] == "TENANT_UNRESOLVED"
    with db.owner() as conn:
        assert conn.execute(
            "SELECT count(*) FROM dlw.audit_log WHERE action = 'auth.login_denied'"
            " AND actor LIKE '%#eve@elsewhere.test'"
        ).fetchone() == (1,)


def test_a_wrong_nonce_is_400(app_client: TestClient):
    response = login(app_client, "ann@acme.test", ["acme-admins"], tamper_nonce=True)
    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "OIDC_NONCE_MISMATCH"


def test_a_client_credentials_token_reaches_its_service_account(
    app_client: TestClient, provider: OidcProvider, db: MigratedDb, acme: int
):
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, %s, %s, 'tenant_operator')",
            (acme, provider.issuer, M2M_CLIENT),
        )
    access = client_credentials_token(provider.issuer, M2M_CLIENT, M2M_SECRET, AUDIENCE)
    me = app_client.get("/api/v1/auth/me", headers=bearer(access))
    assert me.status_code == 200, me.text
    assert me.json()["tenant_id"] == acme and me.json()["role"] == "tenant_operator" and me.json()["is_service"]


def test_login_still_works_after_the_provider_rotates_its_keys(app_client: TestClient, provider: OidcProvider):
    assert login(app_client, "ann@acme.test", ["acme-admins"]).status_code == 200
    provider.rotate_keys()
    after = login(app_client, "ann@acme.test", ["acme-admins"])
    assert after.status_code == 200, after.text
    access = client_credentials_token(provider.issuer, M2M_CLIENT, M2M_SECRET, AUDIENCE)
    assert app_client.get("/api/v1/auth/me", headers=bearer(access)).status_code == 200


# -- identity that cannot be borrowed: an unverified email is never stored ----------------------
@pytest.fixture(scope="module")
def dba_url(db: MigratedDb) -> Iterator[str]:
    """A DBA's login: a member of dlw_admin, nothing else (docs/dba.md)."""
    with dba_login(db) as url:
        yield url


def grant(dba_url: str, user_ref: str, role: str = "tenant_admin") -> str:
    """dlw_admin.grant_role as the DBA: 'granted', or the SQLSTATE of the refusal."""
    with psycopg.connect(dba_url, autocommit=True) as conn:
        try:
            conn.execute("SELECT dlw_admin.grant_role('acme', %s, %s)", (user_ref, role))
        except psycopg.Error as exc:
            return str(exc.sqlstate)
    return "granted"


def stored_email(db: MigratedDb, subject: str) -> tuple[str | None, bool]:
    with db.owner() as conn:
        row = conn.execute("SELECT email, email_verified FROM dlw.users WHERE subject = %s", (subject,)).fetchone()
    return row[0], row[1]


def granted_roles(db: MigratedDb, subject: str) -> list[str]:
    with db.owner() as conn:
        rows = conn.execute(
            "SELECT c.v1 FROM dlw.casbin_rule c JOIN dlw.users u ON c.v0 = 'user:' || u.id::text"
            " WHERE c.ptype = 'g' AND u.subject = %s",
            (subject,),
        ).fetchall()
    return [r[0] for r in rows]


def test_a_viewer_who_claims_a_colleagues_unverified_email_is_not_granted_the_colleagues_role(
    app_client: TestClient, db: MigratedDb, dba_url: str
):
    """The attack: a viewer changes their address at the provider to the boss's (unconfirmed,
    so email_verified is false) and logs in again; the DBA then grants the boss admin by email,
    as docs/dba.md shows, before the boss ever logged in."""
    assert login(app_client, "vic@acme.test").json()["role"] == "tenant_viewer"
    assert stored_email(db, "vic@acme.test") == ("vic@acme.test", True)
    again = login(app_client, "vic@acme.test", claimed_email="boss@acme.test", email_verified=False)
    assert again.status_code == 200 and again.json()["role"] == "tenant_viewer"
    assert stored_email(db, "vic@acme.test") == (None, False), "an unverified address is not kept"
    # Any spelling of the address: nobody in the tenant holds it.
    for ref in ("boss@acme.test", "BOSS@acme.test", " Boss@Acme.Test"):
        assert grant(dba_url, ref) == "DLWA5"
    assert granted_roles(db, "vic@acme.test") == []
    # The boss logs in (the provider verified the address): the grant reaches them, and only them.
    assert login(app_client, "boss@acme.test").status_code == 200
    assert grant(dba_url, "Boss@ACME.test") == "granted"
    assert granted_roles(db, "boss@acme.test") == ["tenant_admin"] and granted_roles(db, "vic@acme.test") == []
    # Claiming the boss's address again, verified or not, changes nothing for the boss's grant.
    login(app_client, "vic@acme.test", claimed_email="BOSS@ACME.TEST", email_verified=False)
    assert stored_email(db, "vic@acme.test") == (None, False)
    assert login(app_client, "vic@acme.test").status_code == 200
    assert stored_email(db, "vic@acme.test") == ("vic@acme.test", True)


def test_an_unverified_email_matches_no_tenant_rule(app_client: TestClient, db: MigratedDb):
    response = login(app_client, "mallory@elsewhere.test", claimed_email="mallory@acme.test", email_verified=False)
    assert response.status_code == 403 and response.json()["detail"]["code"] == "TENANT_UNRESOLVED"
    with db.owner() as conn:
        detail = conn.execute(
            "SELECT detail FROM dlw.audit_log WHERE action = 'auth.login_denied'"
            " AND actor LIKE '%#mallory@elsewhere.test'"
        ).fetchone()[0]
    assert detail["email"] is None and detail["reason"] == "TENANT_UNRESOLVED", "not even the audit keeps it"
    # The same address, verified, is placed by the rule.
    verified = login(app_client, "mallory@elsewhere.test", claimed_email="mallory@acme.test")
    assert verified.status_code == 200 and verified.json()["role"] == "tenant_viewer"
