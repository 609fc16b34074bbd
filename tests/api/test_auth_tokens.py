"""Bearer authentication: system JWTs, the service token, identity-provider access tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import OctKey

from app.api.factory import create_app
from tests.support.app import ADMIN_TOKEN, SECRET, app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.jwks_server import JwksServer
from tests.support.tenants import tenant

AUDIENCE = "dlw-api"


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> dict[str, int]:
    ids = {slug: tenant(db, slug) for slug in ("acme", "globex")}
    with db.owner() as conn:  # a bare inactive tenant row
        conn.execute("INSERT INTO dlw.tenants (slug, display_name, active) VALUES ('sleepy', 'Inactive', false)")
    return ids


@pytest.fixture(scope="module")
def client(db: MigratedDb, idp: JwksServer, tenants: dict[str, int]) -> Iterator[TestClient]:
    settings = app_settings(db, oidc_issuer=idp.issuer, oidc_audience=AUDIENCE)
    with TestClient(create_app(settings)) as c:
        yield c


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def system_claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "dlw-controller",
        "sub": "u1",
        "tid": 2,
        "role": "tenant_admin",
        "pids": [],
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def hs256(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret.encode()), algorithms=["HS256"])


def forged_hs256(header: dict[str, object], claims: dict[str, object], secret: bytes) -> str:
    """The classic algorithm-confusion forgery, built by hand (JOSE libraries refuse to)."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def bad_credentials(idp: JwksServer) -> dict[str, dict[str, str]]:
    valid = hs256(system_claims())
    head, body, sig = valid.split(".")
    tampered_body = b64({**json.loads(base64.urlsafe_b64decode(body + "==")), "tid": 3})
    public_pem = idp.keys[0].as_pem(private=False)
    assert isinstance(public_pem, bytes)
    now = int(time.time())
    return {
        "no header": {},
        "wrong scheme": {"Authorization": f"Basic {valid}"},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage": bearer("not-a-token"),
        "alg none": bearer(b64({"alg": "none", "typ": "JWT"}) + "." + b64(system_claims()) + "."),
        "hs256 signed with the provider's public key": bearer(
            forged_hs256({"alg": "HS256", "kid": idp.keys[0].kid}, idp.access_claims(AUDIENCE, "robot"), public_pem)
        ),
        "expired": bearer(hs256(system_claims(iat=now - 7200, exp=now - 3600))),
        "nbf in the future": bearer(hs256(system_claims(nbf=now + 3600))),
        "wrong issuer": bearer(hs256(system_claims(iss="someone-else"))),
        "wrong secret": bearer(hs256(system_claims(), secret="another-secret-another-secret-xx")),
        "tampered payload": bearer(f"{head}.{tampered_body}.{sig}"),
        "over 8 KB": bearer(hs256(system_claims(pids=["p" * 100] * 90))),
        "system JWT missing tid": bearer(hs256(system_claims(tid=None))),
        "system JWT missing exp": bearer(hs256(system_claims(exp=None))),
        "system JWT missing pids": bearer(hs256(system_claims(pids=None))),
        "system JWT with an unknown role": bearer(hs256(system_claims(role="root"))),
        "tenant 0 for a non-executor": bearer(hs256(system_claims(tid=0))),
        "access token, wrong audience": bearer(idp.sign(idp.access_claims("other-api", "robot"))),
        "access token, wrong issuer": bearer(idp.sign({**idp.access_claims(AUDIENCE, "robot"), "iss": "http://evil"})),
        "access token, expired": bearer(idp.sign({**idp.access_claims(AUDIENCE, "robot"), "exp": now - 60})),
        "access token, not typ at+jwt (an id_token)": bearer(idp.sign(idp.access_claims(AUDIENCE, "robot"), typ="JWT")),
        "access token, unknown client": bearer(idp.sign(idp.access_claims(AUDIENCE, "nobody"))),
        "access token, unknown kid": bearer(idp.sign(idp.access_claims(AUDIENCE, "robot"), key=idp.keys[1])),
    }


def test_every_bad_credential_gets_the_same_terse_401(
    client: TestClient, idp: JwksServer, db: MigratedDb, tenants: dict[str, int]
):
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, %s, 'robot', 'tenant_operator') ON CONFLICT DO NOTHING",
            (tenants["acme"], idp.issuer),
        )
    # Positive controls: the same client accepts well-formed credentials of both kinds.
    assert client.get("/api/v1/auth/me", headers=bearer(hs256(system_claims()))).status_code == 200
    assert (
        client.get("/api/v1/auth/me", headers=bearer(idp.sign(idp.access_claims(AUDIENCE, "robot")))).status_code == 200
    )
    cases = bad_credentials(idp)
    assert len(cases["over 8 KB"]["Authorization"]) > 8192
    for name, headers in cases.items():
        response = client.get("/api/v1/auth/me", headers=headers)
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"] == "Bearer", name
        assert response.json()["detail"]["code"] == "UNAUTHENTICATED", name


def test_a_system_jwt_yields_its_principal(client: TestClient):
    response = client.get("/api/v1/auth/me", headers=bearer(token(2, "tenant_viewer", "user-7")))
    assert response.status_code == 200
    assert response.json() == {
        "user_id": "user-7",
        "tenant_id": 2,
        "role": "tenant_viewer",
        "project_ids": [],
        "is_service": False,
    }


def test_the_service_token_is_a_system_admin_of_the_platform_tenant(client: TestClient, tenants: dict[str, int]):
    me = client.get("/api/v1/auth/me", headers=bearer(ADMIN_TOKEN)).json()
    assert me == {
        "user_id": "service:system-admin",
        "tenant_id": 1,
        "role": "system_admin",
        "project_ids": [],
        "is_service": True,
    }
    for ref in ("acme", str(tenants["acme"])):
        me = client.get("/api/v1/auth/me", headers={**bearer(ADMIN_TOKEN), "X-DLW-Tenant": ref}).json()
        assert me["tenant_id"] == tenants["acme"] and me["role"] == "system_admin"
    unknown = client.get("/api/v1/auth/me", headers={**bearer(ADMIN_TOKEN), "X-DLW-Tenant": "nope"})
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "TENANT_NOT_FOUND"
    near_miss = client.get("/api/v1/auth/me", headers=bearer(ADMIN_TOKEN[:-1] + "X"))
    assert near_miss.status_code == 401


@pytest.mark.parametrize("role", ["tenant_admin", "tenant_operator", "tenant_viewer", "executor"])
def test_only_a_system_admin_may_name_another_tenant(client: TestClient, tenants: dict[str, int], role: str):
    headers = {**bearer(token(tenants["globex"], role)), "X-DLW-Tenant": "acme"}
    response = client.get("/api/v1/auth/me", headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"]["code"] == "TENANT_HEADER_FORBIDDEN"


def test_an_idp_access_token_maps_to_its_service_account(
    client: TestClient, idp: JwksServer, db: MigratedDb, tenants: dict[str, int]
):
    with db.owner() as conn:
        account = conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, %s, 'ci-bot', 'tenant_operator') RETURNING id",
            (tenants["globex"], idp.issuer),
        ).fetchone()[0]
    access = idp.sign(idp.access_claims(AUDIENCE, "ci-bot"))
    me = client.get("/api/v1/auth/me", headers=bearer(access)).json()
    assert me == {
        "user_id": f"sa:{account}",
        "tenant_id": tenants["globex"],
        "role": "tenant_operator",
        "project_ids": [],
        "is_service": True,
    }


def test_a_client_registered_in_two_tenants_or_an_inactive_one_is_refused(
    client: TestClient, idp: JwksServer, db: MigratedDb, tenants: dict[str, int]
):
    with db.owner() as conn:
        for tenant_id in (tenants["acme"], tenants["globex"]):
            conn.execute(
                "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
                " VALUES (%s, %s, 'twin', 'tenant_viewer')",
                (tenant_id, idp.issuer),
            )
        conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " SELECT tenant_id, %s, 'sleeper', 'tenant_viewer' FROM dlw.tenants WHERE slug = 'sleepy'",
            (idp.issuer,),
        )
    for client_id in ("twin", "sleeper"):
        response = client.get("/api/v1/auth/me", headers=bearer(idp.sign(idp.access_claims(AUDIENCE, client_id))))
        assert response.status_code == 401, client_id


def test_rotated_provider_keys_are_fetched_once_on_an_unknown_kid(db: MigratedDb, tenants: dict[str, int]):
    idp = JwksServer()
    try:
        with db.owner() as conn:
            conn.execute(
                "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
                " VALUES (%s, %s, 'rotor', 'tenant_viewer')",
                (tenants["acme"], idp.issuer),
            )
        settings = app_settings(db, oidc_issuer=idp.issuer, oidc_audience=AUDIENCE)
        with TestClient(create_app(settings)) as c:
            first = idp.sign(idp.access_claims(AUDIENCE, "rotor"))
            assert c.get("/api/v1/auth/me", headers=bearer(first)).status_code == 200
            assert c.get("/api/v1/auth/me", headers=bearer(first)).status_code == 200
            assert idp.fetches == 1, "the JWKS is cached"
            idp.rotate()
            second = idp.sign(idp.access_claims(AUDIENCE, "rotor"))
            assert c.get("/api/v1/auth/me", headers=bearer(second)).status_code == 200
            assert idp.fetches == 2, "one refetch for the new kid"
            # A made-up kid right after that does not trigger another fetch.
            bogus = idp.sign(idp.access_claims(AUDIENCE, "rotor"), key=idp.keys[0])
            assert c.get("/api/v1/auth/me", headers=bearer(bogus)).status_code == 401
            assert idp.fetches == 2
    finally:
        idp.close()


def test_access_tokens_are_refused_when_no_audience_is_configured(db: MigratedDb, idp: JwksServer):
    with TestClient(create_app(app_settings(db, oidc_issuer=idp.issuer))) as c:
        access = idp.sign(idp.access_claims(AUDIENCE, "robot"))
        assert c.get("/api/v1/auth/me", headers=bearer(access)).status_code == 401
