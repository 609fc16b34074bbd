"""casbin semantics, live reload of grants across running instances, and denial audits."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.authz.authorizer import Authorizer
from tests.support import server
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb, free_port
from tests.support.deployment import grant_round_trip, time_until


@pytest.fixture(scope="module")
def authorizer(db: MigratedDb) -> Authorizer:
    """The real enforcer with the real policy, loaded through the adapter as dlw_app."""

    async def load() -> Authorizer:
        pool = await asyncpg.create_pool(db.app_url, min_size=1, max_size=2)
        authz = Authorizer(pool)
        await authz.reload()
        await pool.close()
        return authz

    return asyncio.run(load())


@pytest.mark.parametrize(
    ("role", "obj", "act"),
    [
        ("tenant_operator", "/api/v1/tasks", "POSTX"),
        ("tenant_operator", "/api/v1/tasks", "XPOST"),
        ("tenant_operator", "/api/v1/tasks", "POST|GET"),
        ("tenant_viewer", "/api/v1/tasks", "GETS"),
        ("tenant_viewer", "/api/v1/tasks", "post"),
        ("tenant_viewer", "/api/v1/quota/current/../../tasks", "POST"),
        ("tenant_viewer", "/api/v1/tasks", "POST"),
        ("tenant_viewer", "/api/v1/quotaX", "GET"),
        ("tenant_viewer", "/api/v1/quota", "GET"),
        ("tenant_viewer", "/api/v1/tasksX", "GET"),
        ("tenant_viewer", "/api/v1/tasks.", "GET"),
        ("tenant_viewer", "/api/v1/tasks%2F..%2Fusers", "GET"),
        ("tenant_viewer", "/api/v1/users", "GET"),
        ("tenant_operator", "/api/v1/tasksX/1/cancel", "POST"),
        ("tenant_admin", "/api/v1/tenants", "GET"),
        ("tenant_admin", "/api/v1/tenants/1", "GET"),
        ("executor", "/api/v1/tasks", "GET"),
        ("executor", "/api/v1/executorX/claim", "POST"),
        ("nobody", "/api/v1/auth/me", "GET"),
    ],
)
def test_casbin_denies(authorizer: Authorizer, role: str, obj: str, act: str):
    assert authorizer.decide(role, obj, act, True) is False


@pytest.mark.parametrize(
    ("role", "obj", "act", "same"),
    [
        ("tenant_viewer", "/api/v1/tasks", "GET", True),
        ("tenant_viewer", "/api/v1/quota/current", "GET", True),
        ("tenant_operator", "/api/v1/tasks", "POST", True),  # inherited through g rows of the policy
        ("tenant_admin", "/api/v1/tasks/{task_id}/cancel", "POST", True),
        ("system_admin", "/api/v1/tenants/{tenant_id}", "PATCH", False),
        ("executor", "/api/v1/executor/claim", "POST", False),
    ],
)
def test_casbin_allows(authorizer: Authorizer, role: str, obj: str, act: str, same: bool):
    assert authorizer.decide(role, obj, act, same) is True


def test_tenant_scoped_rules_need_the_same_tenant(authorizer: Authorizer):
    assert authorizer.decide("tenant_admin", "/api/v1/users", "GET", True)
    assert not authorizer.decide("tenant_admin", "/api/v1/users", "GET", False)


def test_decisions_are_cached_until_reload(authorizer: Authorizer):
    authorizer.decide("tenant_viewer", "/api/v1/tasks", "GET", True)
    started = time.perf_counter()
    for _ in range(10_000):
        authorizer.decide("tenant_viewer", "/api/v1/tasks", "GET", True)
    per_check = (time.perf_counter() - started) / 10_000
    assert per_check < 50e-6, f"{per_check * 1e6:.1f} us per cached check"


def test_path_tricks_through_the_api_never_reach_another_route(db: MigratedDb):
    with TestClient(create_app(app_settings(db))) as client:
        viewer = bearer(token(1, "tenant_viewer"))
        for path in (
            "/api/v1/usersX",
            "/api/v1/users.",
            "/api/v1/auth/me/../../users",
            "/api/v1/auth%2F..%2Fusers",
            "/api/v1//users",
            "/API/V1/USERS",
        ):
            response = client.get(path, headers=viewer)
            assert response.status_code in (403, 404), path
            assert "items" not in response.text and "subject" not in response.text, path


def test_denials_are_audited_even_when_the_request_is_malformed(db: MigratedDb):
    with TestClient(create_app(app_settings(db))) as client:
        operator = {**bearer(token(1, "tenant_operator", user_id="denied-op")), "Content-Type": "application/json"}
        response = client.post("/api/v1/tenants", headers=operator, content=b"{not json at all")
        assert response.status_code == 403 and response.json()["detail"]["code"] == "RBAC_DENIED"
        response = client.get("/api/v1/users", headers=operator)
        assert response.status_code == 403
    with db.owner() as conn:
        rows = conn.execute(
            "SELECT tenant_id, target, detail->>'role' FROM dlw.audit_log"
            " WHERE action = 'permission_denied' AND actor = 'denied-op' ORDER BY at"
        ).fetchall()
    assert rows == [(1, "POST /api/v1/tenants", "tenant_operator"), (1, "GET /api/v1/users", "tenant_operator")]


def test_a_flood_of_denials_leaves_o1_audit_rows_with_the_count(db: MigratedDb):
    """The attack: every forbidden request appended a row, so a loop of 403s grew the trail
    without bound. Repeats of one principal on one route in one minute now share a row."""
    with TestClient(create_app(app_settings(db))) as client:
        viewer = bearer(token(1, "tenant_viewer", user_id="flooder"))
        for i in range(500):
            response = client.get("/api/v1/users", headers=viewer, params={"n": i})
            assert response.status_code == 403
        assert client.get("/api/v1/audit", headers=viewer).status_code == 403
        admin = bearer(token(1, "tenant_admin"))
        page = client.get("/api/v1/audit", headers=admin, params={"action": "permission_denied", "limit": 200})
        mine = [item for item in page.json()["items"] if item["actor"] == "flooder"]
    with db.owner() as conn:
        rows = conn.execute(
            "SELECT target, count, last_at >= at FROM dlw.audit_log WHERE action = 'permission_denied'"
            " AND actor = 'flooder' ORDER BY at"
        ).fetchall()
    users = [r for r in rows if r[0] == "GET /api/v1/users"]
    assert len(users) <= 2 and sum(r[1] for r in users) == 500  # two rows only across a minute boundary
    assert all(r[2] for r in rows)
    assert [r[0] for r in rows if r[0] != "GET /api/v1/users"] == ["GET /api/v1/audit"]
    assert sum(item["count"] for item in mine) == 501 and all(item["last_at"] for item in mine)


def test_a_grant_in_sql_reaches_running_instances_within_a_second(db: MigratedDb):
    ports = [free_port(), free_port()]
    procs = [server.start(server.serve_env(db), port) for port in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            server.wait_ready(proc, port)
        granted, revoked = grant_round_trip(db, [f"http://127.0.0.1:{port}" for port in ports], "promoted-user")
        assert max(granted) < 1.0, granted
        assert max(revoked) < 1.0, revoked
    finally:
        for proc in procs:
            server.stop(proc)


def test_the_listener_reconnects_after_its_connection_is_killed(db: MigratedDb):
    port = free_port()
    proc = server.start(server.serve_env(db), port)
    try:
        server.wait_ready(proc, port)
        with db.owner() as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'dlw-api-listen' AND datname = current_database()"
            ).fetchone()[0]
        assert killed == 1
        time.sleep(0.2)
        viewer = bearer(token(1, "tenant_viewer", user_id="late-user"))
        url = f"http://127.0.0.1:{port}/api/v1/users"
        with db.owner() as conn:
            conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:late-user', 'tenant_admin')")
        assert time_until(url, viewer, 200, limit=10) < 10
    finally:
        server.stop(proc)
