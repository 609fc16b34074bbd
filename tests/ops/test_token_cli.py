"""`dlw token issue`: prints only a system JWT that the API accepts."""

from __future__ import annotations

import os
import subprocess
import sys

from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import SECRET, app_settings, bearer
from tests.support.database import MigratedDb
from tests.support.tenants import tenant


def issue(db: MigratedDb, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")}
    env["DLW_DATABASE_URL"] = db.app_url
    if secret:
        env["DLW_SYSTEM_JWT_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "app", "token", "issue", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_token_issue_for_a_tenant_role_and_user(db: MigratedDb):
    acme = tenant(db, "acme", name="Acme")
    result = issue(db, "--tenant", "acme", "--role", "tenant_operator", "--user", "u-42", "--ttl", "120")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2, "only the token on stdout"
    with TestClient(create_app(app_settings(db))) as client:
        me = client.get("/api/v1/auth/me", headers=bearer(token)).json()
    assert me == {
        "user_id": "u-42",
        "tenant_id": acme,
        "role": "tenant_operator",
        "project_ids": [],
        "is_service": False,
    }


def test_a_system_wide_executor_token_needs_no_tenant(db: MigratedDb):
    result = issue(db, "--role", "executor")
    assert result.returncode == 0, result.stderr
    with TestClient(create_app(app_settings(db))) as client:
        me = client.get("/api/v1/auth/me", headers=bearer(result.stdout.strip())).json()
    assert me["tenant_id"] == 0 and me["role"] == "executor" and me["is_service"] is True


def test_token_issue_refusals(db: MigratedDb):
    assert "--tenant is required" in issue(db, "--role", "tenant_admin").stderr
    assert "no tenant 'nope'" in issue(db, "--tenant", "nope", "--role", "tenant_admin").stderr
    weak = issue(db, "--tenant", "acme", "--role", "tenant_admin", secret=None)
    assert weak.returncode == 2 and "DLW_SYSTEM_JWT_SECRET" in weak.stderr and weak.stdout == ""
