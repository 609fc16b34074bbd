"""`dlw serve` refuses an insecure configuration, one clear line naming the setting."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.support import server
from tests.support.app import SECRET, SECRET_KEY, UNUSED_ISSUER
from tests.support.database import MigratedDb, free_port


def serve(env_overrides: dict[str, str | None], port: int = 0) -> subprocess.Popen[str]:
    return server.start(server.serve_env(None, **env_overrides), port or free_port(), stdout=subprocess.PIPE)


def secure_env(db: MigratedDb) -> dict[str, str | None]:
    return {
        "DLW_DATABASE_URL": db.app_url,
        "DLW_SYSTEM_JWT_SECRET": SECRET,
        "DLW_OIDC_ISSUER": UNUSED_ISSUER,
        "DLW_SECRET_KEY": SECRET_KEY,
    }


CASES = {
    "default secret": ({"DLW_SYSTEM_JWT_SECRET": None}, "DLW_SYSTEM_JWT_SECRET is the default"),
    "short secret": ({"DLW_SYSTEM_JWT_SECRET": "x" * 31}, "DLW_SYSTEM_JWT_SECRET is the default or shorter than 32"),
    "no issuer": ({"DLW_OIDC_ISSUER": None}, "DLW_OIDC_ISSUER is not set"),
    "no secret key": ({"DLW_SECRET_KEY": None}, "DLW_SECRET_KEY is not set or shorter than 32 bytes"),
    "short secret key": ({"DLW_SECRET_KEY": "k" * 31}, "DLW_SECRET_KEY is not set or shorter than 32 bytes"),
    "wildcard rule": (
        {"DLW_AUTH_TENANT_RULES_JSON": '[{"email_domain": "*", "tenant": "acme"}]'},
        "DLW_AUTH_TENANT_RULES_JSON has a wildcard email_domain rule",
    ),
    "invalid rules": ({"DLW_AUTH_TENANT_RULES_JSON": "{not json"}, "DLW_AUTH_TENANT_RULES_JSON is invalid"),
    "superuser database role": (
        {"DLW_DATABASE_URL": "OWNER"},
        "DLW_DATABASE_URL: database role postgres is a superuser",
    ),
    "no database": ({"DLW_DATABASE_URL": None}, "DLW_DATABASE_URL is not set"),
    "tokens mode with an issuer": (
        {"DLW_AUTH_MODE": "tokens"},
        "DLW_AUTH_MODE=tokens has no identity provider: unset DLW_OIDC_ISSUER",
    ),
    "tokens mode with login rules": (
        {
            "DLW_AUTH_MODE": "tokens",
            "DLW_OIDC_ISSUER": None,
            "DLW_AUTH_TENANT_RULES_JSON": '[{"email_domain": "acme.test", "tenant": "acme"}]',
        },
        "DLW_AUTH_MODE=tokens has no logins to place",
    ),
    "tokens mode keeps the secret guard": (
        {"DLW_AUTH_MODE": "tokens", "DLW_OIDC_ISSUER": None, "DLW_SYSTEM_JWT_SECRET": None},
        "DLW_SYSTEM_JWT_SECRET is the default",
    ),
    "an unknown auth mode": ({"DLW_AUTH_MODE": "none"}, "DLW_AUTH_MODE"),
    "metrics by token without a token": ({"DLW_METRICS_ACCESS": "token"}, "DLW_METRICS_ACCESS=token needs"),
    "metrics on a bad bind": (
        {"DLW_METRICS_ACCESS": "port", "DLW_METRICS_BIND": "9464"},
        "DLW_METRICS_BIND must be HOST:PORT",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_insecure_settings_stop_serve(db: MigratedDb, case: str):
    overrides, message = CASES[case]
    env = secure_env(db) | {k: (db.owner_url if v == "OWNER" else v) for k, v in overrides.items()}
    proc = serve(env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("dlw: refusing to start: ")]
    assert any(message in line for line in lines), err
    assert "Traceback" not in err


def test_bypassrls_app_role_stops_serve(db: MigratedDb):
    db.server.execute("ALTER ROLE dlw_app BYPASSRLS")
    try:
        proc = serve(secure_env(db))
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert "DLW_DATABASE_URL: database role dlw_app has BYPASSRLS" in err
    finally:
        db.server.execute("ALTER ROLE dlw_app NOBYPASSRLS")


def test_a_secure_configuration_serves(db: MigratedDb):
    with server.running_server(db) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}


def test_token_only_mode_serves_without_an_identity_provider(db: MigratedDb):
    """DLW_AUTH_MODE=tokens: no DLW_OIDC_*; tokens work, logins answer OIDC_NOT_CONFIGURED."""
    from tests.support.app import token

    with server.running_server(db, DLW_AUTH_MODE="tokens", DLW_OIDC_ISSUER=None) as base:
        viewer = {"Authorization": f"Bearer {token(1, 'tenant_viewer')}"}
        assert httpx.get(f"{base}/api/v1/tasks", headers=viewer).status_code == 200
        login = httpx.get(f"{base}/api/v1/auth/login")
        assert login.status_code >= 400 and login.json()["detail"]["code"] == "OIDC_NOT_CONFIGURED"
