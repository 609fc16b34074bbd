"""The administration API: tenants (system_admin), users, service accounts, audit trail."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from tests.support.app import ADMIN_TOKEN, app_settings, bearer, every_page, token
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

SYSTEM = bearer(ADMIN_TOKEN)


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, oidc_issuer="https://idp.example"))) as c:
        yield c


def new_tenant(client: TestClient, slug: str, **limits: int) -> dict[str, object]:
    response = client.post(
        "/api/v1/tenants", headers=SYSTEM, json={"slug": slug, "display_name": slug.title(), **limits}
    )
    assert response.status_code == 201, response.text
    return response.json()


def add_user(db: MigratedDb, tenant_id: int, subject: str, role: str) -> str:
    with db.owner() as conn:
        return str(
            conn.execute(
                "INSERT INTO dlw.users (tenant_id, issuer, subject, role) VALUES (%s, 'https://idp',"
                " %s, %s) RETURNING id",
                (tenant_id, subject, role),
            ).fetchone()[0]
        )


def test_creating_a_tenant_provisions_its_defaults_and_is_audited(client: TestClient, db: MigratedDb):
    tenant = new_tenant(client, "initech", quota_concurrent=3, quota_bytes_month=0, quota_storage_gb=5)
    assert tenant["quota_concurrent"] == 3 and tenant["quota_bytes_month"] == 0 and tenant["active"] is True
    with db.owner() as conn:
        tid = tenant["tenant_id"]
        assert conn.execute("SELECT name, is_default FROM dlw.projects WHERE tenant_id = %s", (tid,)).fetchall() == [
            ("default", True)
        ]
        assert conn.execute("SELECT name FROM dlw.storage_targets WHERE tenant_id = %s", (tid,)).fetchall() == [
            ("default",)
        ]
        assert conn.execute(
            "SELECT actor FROM dlw.audit_log WHERE tenant_id = %s AND action = 'tenant.created'", (tid,)
        ).fetchall() == [("service:system-admin",)]
    again = client.post("/api/v1/tenants", headers=SYSTEM, json={"slug": "initech", "display_name": "Again"})
    assert again.status_code == 409 and again.json()["detail"]["code"] == "TENANT_EXISTS"


@pytest.mark.parametrize(
    "body",
    [
        {"slug": "Bad Slug", "display_name": "x"},
        {"slug": "ok-slug", "display_name": ""},
        {"slug": "ok-slug", "display_name": "x", "quota_concurrent": -1},
        {"slug": "ok-slug", "display_name": "x", "unexpected": 1},
        {"display_name": "x"},
    ],
)
def test_bad_tenant_bodies_are_422_with_the_field(client: TestClient, body: dict[str, object]):
    response = client.post("/api/v1/tenants", headers=SYSTEM, json=body)
    assert response.status_code == 422
    assert all(err["loc"][0] == "body" for err in response.json()["detail"]["errors"])


def test_system_admin_lists_reads_and_patches_tenants(client: TestClient):
    tenant = new_tenant(client, "hooli")
    tid = tenant["tenant_id"]
    listed = client.get("/api/v1/tenants", headers=SYSTEM).json()
    assert {"default", "hooli"} <= {t["slug"] for t in listed}
    patched = client.patch(f"/api/v1/tenants/{tid}", headers=SYSTEM, json={"quota_concurrent": 0, "active": False})
    assert patched.status_code == 200
    assert patched.json()["quota_concurrent"] == 0 and patched.json()["active"] is False
    assert client.get(f"/api/v1/tenants/{tid}", headers=SYSTEM).json()["active"] is False
    assert client.get("/api/v1/tenants/999999", headers=SYSTEM).status_code == 404
    assert client.patch("/api/v1/tenants/999999", headers=SYSTEM, json={"active": True}).status_code == 404


def test_tenant_admin_manages_roles_but_never_above_tenant_admin(client: TestClient, db: MigratedDb):
    tid = new_tenant(client, "piedpiper")["tenant_id"]
    admin_id = add_user(db, tid, "richard", "tenant_admin")
    viewer_id = add_user(db, tid, "jared", "tenant_viewer")
    admin = bearer(token(tid, "tenant_admin", user_id=admin_id))
    users = client.get("/api/v1/users", headers=admin).json()["items"]
    assert {u["subject"] for u in users} == {"richard", "jared"}

    promoted = client.patch(f"/api/v1/users/{viewer_id}", headers=admin, json={"role": "tenant_operator"})
    assert promoted.status_code == 200 and promoted.json()["role"] == "tenant_operator"
    for role in ("system_admin", "executor", "root"):
        refused = client.patch(f"/api/v1/users/{viewer_id}", headers=admin, json={"role": role})
        assert refused.status_code == 422 and refused.json()["detail"]["errors"][0]["loc"] == ["body", "role"]

    last = client.patch(f"/api/v1/users/{admin_id}", headers=admin, json={"role": "tenant_viewer"})
    assert last.status_code == 409 and last.json()["detail"]["code"] == "LAST_TENANT_ADMIN"
    audit = client.get("/api/v1/audit", headers=admin, params={"action": "user.role_changed"}).json()["items"]
    assert [(a["target"], a["detail"]) for a in audit] == [
        (viewer_id, {"from": "tenant_viewer", "to": "tenant_operator"})
    ]


def test_two_admins_demoting_each_other_at_once_leave_one_admin(client: TestClient, db: MigratedDb):
    """Admin A's demotion of B is in flight (not committed) when B demotes A: B's call waits
    on the tenant's admin rows, then sees A's change and refuses."""
    tid = new_tenant(client, "aviato")["tenant_id"]
    a, b = add_user(db, tid, "erlich", "tenant_admin"), add_user(db, tid, "big-head", "tenant_admin")
    first = psycopg.connect(db.app_url)
    as_tenant(first, tid, "tenant_admin", user=a)
    assert first.execute("SELECT dlw.set_user_role(%s, 'tenant_viewer')", (b,)).fetchone() == ("ok",)
    results: list[str] = []

    def second() -> None:
        with psycopg.connect(db.app_url) as conn:
            as_tenant(conn, tid, "tenant_admin", user=b)
            results.append(conn.execute("SELECT dlw.set_user_role(%s, 'tenant_viewer')", (a,)).fetchone()[0])

    th = threading.Thread(target=second)
    th.start()
    th.join(0.5)
    assert th.is_alive(), "the second demotion waits for the first"
    first.commit()
    first.close()
    th.join(10)
    assert results == ["LAST_TENANT_ADMIN"]
    with db.owner() as conn:
        assert conn.execute(
            "SELECT count(*) FROM dlw.users WHERE tenant_id = %s AND role = 'tenant_admin'", (tid,)
        ).fetchone() == (1,)


def test_service_accounts_lifecycle(client: TestClient, db: MigratedDb):
    tid = new_tenant(client, "raviga")["tenant_id"]
    admin = bearer(token(tid, "tenant_admin"))
    created = client.post(
        "/api/v1/service-accounts",
        headers=admin,
        json={"client_id": "ci-robot", "role": "tenant_operator", "description": "CI"},
    )
    assert created.status_code == 201, created.text
    account = created.json()
    assert account["issuer"] == "https://idp.example" and account["role"] == "tenant_operator"
    dup = client.post(
        "/api/v1/service-accounts", headers=admin, json={"client_id": "ci-robot", "role": "tenant_viewer"}
    )
    assert dup.status_code == 409 and dup.json()["detail"]["code"] == "SERVICE_ACCOUNT_EXISTS"
    assert [a["client_id"] for a in client.get("/api/v1/service-accounts", headers=admin).json()] == ["ci-robot"]
    assert client.delete(f"/api/v1/service-accounts/{account['id']}", headers=admin).status_code == 204
    assert client.delete(f"/api/v1/service-accounts/{account['id']}", headers=admin).status_code == 404
    actions = [a["action"] for a in client.get("/api/v1/audit", headers=admin).json()["items"]]
    assert actions[:2] == ["service_account.deleted", "service_account.created"]


def test_audit_pages_newest_first_and_stays_in_the_tenant(client: TestClient, db: MigratedDb):
    tid = new_tenant(client, "bachman")["tenant_id"]
    other = new_tenant(client, "endframe")["tenant_id"]
    with db.owner() as conn:
        for i in range(7):
            conn.execute(
                "INSERT INTO dlw.audit_log (tenant_id, actor, action, target) VALUES (%s, 'x', 'probe', %s)",
                (tid, str(i)),
            )
        conn.execute(
            "INSERT INTO dlw.audit_log (tenant_id, actor, action) VALUES (%s, 'x', 'secret-of-other')", (other,)
        )
    admin = bearer(token(tid, "tenant_admin"))
    seen = [item["target"] for item in every_page(client, "/api/v1/audit", admin, {"limit": 3, "action": "probe"})]
    assert seen == [str(i) for i in reversed(range(7))]
    everything = client.get("/api/v1/audit", headers=admin, params={"limit": 200}).json()["items"]
    assert "secret-of-other" not in {item["action"] for item in everything}
    bad = client.get("/api/v1/audit", headers=admin, params={"cursor": "garbage!"})
    assert bad.status_code == 422 and bad.json()["detail"]["code"] == "INVALID_CURSOR"
    assert client.get("/api/v1/audit", headers=admin, params={"limit": 201}).status_code == 422


def test_tenant_admin_cannot_reach_another_tenant(client: TestClient, db: MigratedDb):
    a = new_tenant(client, "tenant-a2")["tenant_id"]
    b = new_tenant(client, "tenant-b2")["tenant_id"]
    b_user = add_user(db, b, "b-user", "tenant_viewer")
    admin_a = bearer(token(a, "tenant_admin"))
    assert client.patch(f"/api/v1/users/{b_user}", headers=admin_a, json={"role": "tenant_admin"}).status_code == 404
    assert b_user not in {u["id"] for u in client.get("/api/v1/users", headers=admin_a).json()["items"]}
    assert client.get(f"/api/v1/tenants/{b}", headers=admin_a).status_code == 403
    assert client.get(f"/api/v1/tenants/{a}", headers=admin_a).status_code == 403
    with db.owner() as conn:
        assert conn.execute("SELECT role FROM dlw.users WHERE id = %s", (uuid.UUID(b_user),)).fetchone() == (
            "tenant_viewer",
        )


def test_users_page_with_a_cursor(client: TestClient, db: MigratedDb):
    tid = new_tenant(client, "pagers")["tenant_id"]
    ids = [add_user(db, tid, f"user-{i}", "tenant_viewer") for i in range(5)]
    admin = bearer(token(tid, "tenant_admin"))
    seen = [u["id"] for u in every_page(client, "/api/v1/users", admin, {"limit": 2})]
    assert sorted(seen) == sorted(ids) and len(seen) == 5


def test_concurrent_creates_of_one_slug_give_one_tenant(client: TestClient):
    import concurrent.futures

    def create() -> int:
        return client.post("/api/v1/tenants", headers=SYSTEM, json={"slug": "racer", "display_name": "R"}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: create(), range(4)))
    assert codes == [201, 409, 409, 409]


def test_the_platform_tenant_cannot_be_deactivated(client: TestClient):
    response = client.patch("/api/v1/tenants/1", headers=SYSTEM, json={"active": False})
    assert response.status_code == 409 and response.json()["detail"]["code"] == "PLATFORM_TENANT"


@pytest.mark.parametrize("role", ["tenant_admin", "tenant_operator", "tenant_viewer", "executor", None])
def test_platform_functions_refuse_every_other_role_in_sql(db: MigratedDb, role: str | None):
    """Defense in depth: the definer functions check the acting role themselves."""
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, 1, role, user="x")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM dlw.platform_create_tenant('sneaky', 'S', 1, 1, 1)")
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, 1, role, user="x")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT dlw.platform_update_tenant(1, 0, 0, 0, true, 'x')")
