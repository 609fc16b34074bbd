"""The tenant's hub token: write-only (no route, reporting login or audit row shows it),
encrypted at rest and bound to its tenant, tenant_admin only, isolated per tenant, and handed to
an executor only with a claim of that tenant's files."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api import hub_secrets
from app.api.factory import create_app
from tests.support.app import SECRET_KEY, app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

TOKEN_A = "hf_tenant_a_secret_0123456789"
TOKEN_B = "hf_tenant_b_secret_9876543210"


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


@pytest.fixture(scope="module")
def two(db: MigratedDb, client: TestClient) -> tuple[int, int]:
    a, b = tenant(db, "token-a", concurrent=0), tenant(db, "token-b", concurrent=0)
    for tid, value in ((a, TOKEN_A), (b, TOKEN_B)):
        put = client.put("/api/v1/hub-token", headers=bearer(token(tid, "tenant_admin")), json={"token": value})
        assert put.status_code == 200 and put.json() == {"outcome": "set"}, put.text
    return a, b


def test_only_tenant_admins_manage_it_and_no_answer_shows_it(client, two):
    a, _ = two
    for role in ("tenant_operator", "tenant_viewer"):
        headers = bearer(token(a, role))
        assert client.put("/api/v1/hub-token", headers=headers, json={"token": "hf_x"}).status_code == 403
        assert client.delete("/api/v1/hub-token", headers=headers).status_code == 403
        assert client.get("/api/v1/hub-token", headers=headers).status_code == 403
    status = client.get("/api/v1/hub-token", headers=bearer(token(a, "tenant_admin")))
    assert status.status_code == 200 and status.json()["set"] is True and TOKEN_A not in status.text
    bad = client.put("/api/v1/hub-token", headers=bearer(token(a, "tenant_admin")), json={"token": "a b\n"})
    assert bad.status_code == 422  # it becomes a header: visible ASCII only


def test_stored_encrypted_bound_to_the_tenant_and_absent_from_the_audit_trail(db, two):
    a, b = two
    with db.owner() as conn:
        rows = dict(
            conn.execute("SELECT tenant_id, ciphertext FROM dlw.hub_tokens WHERE tenant_id IN (%s, %s)", (a, b))
        )
        audit = conn.execute(
            "SELECT action, detail::text FROM dlw.audit_log WHERE tenant_id IN (%s, %s) AND action LIKE 'hub_token.%%'",
            (a, b),
        ).fetchall()
    assert TOKEN_A.encode() not in rows[a] and TOKEN_B.encode() not in rows[b]
    assert hub_secrets.unseal(SECRET_KEY, a, rows[a]) == TOKEN_A
    with pytest.raises(hub_secrets.UndecryptableToken):  # moved to another tenant's row: useless
        hub_secrets.unseal(SECRET_KEY, b, rows[a])
    with pytest.raises(hub_secrets.UndecryptableToken):
        hub_secrets.unseal("another-key-another-key-another-key", a, rows[a])
    assert {action for action, _ in audit} == {"hub_token.set"}
    assert not [d for _, d in audit if "hf_" in d]


def test_another_tenant_cannot_read_overwrite_or_detect_it(db, two):
    a, b = two
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, a, "tenant_admin")
        assert [r[0] for r in conn.execute("SELECT tenant_id FROM dlw.hub_tokens")] == [a]
        assert (
            conn.execute("UPDATE dlw.hub_tokens SET ciphertext = ciphertext WHERE tenant_id = %s", (b,)).rowcount == 0
        )
        assert conn.execute("DELETE FROM dlw.hub_tokens WHERE tenant_id = %s", (b,)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # WITH CHECK: only the own tenant's row
            conn.execute("INSERT INTO dlw.hub_tokens (tenant_id, ciphertext) VALUES (%s, %s)", (b, b"\x01" * 40))
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, a, "tenant_operator")  # reads it (task creation asks the hub with it), cannot write
        assert conn.execute("SELECT count(*) FROM dlw.hub_tokens").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT dlw.set_hub_token(%s)", (b"\x01" * 40,))
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, a, "tenant_viewer")
        assert conn.execute("SELECT dlw.hub_token_ciphertext()").fetchone() == (None,)
    with db.owner() as conn:
        assert conn.execute("SELECT has_table_privilege('dlw_reporting', 'dlw.hub_tokens', 'SELECT')").fetchone() == (
            False,
        )


def test_claims_carry_the_token_of_the_files_tenant_only(client, db, two):
    a, b = two
    c = tenant(db, "token-c", concurrent=0)  # no token
    for tid in (a, b, c):
        made = client.post(
            "/api/v1/tasks",
            headers=bearer(token(tid, "tenant_operator")),
            json={"repo_id": "org/m", "files": [{"path": "f.bin", "size": 1}]},
        )
        assert made.status_code == 201, made.text
    scoped = client.post("/api/v1/executor/claim", headers=bearer(token(a, "executor")), json={"max_files": 10})
    assert {(f["tenant_id"], f["hub_token"]) for f in scoped.json()["files"]} == {(a, TOKEN_A)}
    everyone = client.post("/api/v1/executor/claim", headers=bearer(token(0, "executor")), json={"max_files": 100})
    by_tenant = {f["tenant_id"]: f["hub_token"] for f in everyone.json()["files"] if f["tenant_id"] in (b, c)}
    assert by_tenant == {b: TOKEN_B, c: None}


def test_clear_and_clear_again(client, db):
    tid = tenant(db, "token-clear")
    admin = bearer(token(tid, "tenant_admin"))
    missing = client.delete("/api/v1/hub-token", headers=admin)
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "HUB_TOKEN_NOT_SET"
    client.put("/api/v1/hub-token", headers=admin, json={"token": "hf_soon_gone"})
    assert client.delete("/api/v1/hub-token", headers=admin).status_code == 204
    assert client.get("/api/v1/hub-token", headers=admin).json() == {"set": False, "set_at": None, "set_by": None}
