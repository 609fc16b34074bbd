"""Every route x every role x same/other tenant x every method -> the expected status,
through the real API. The expectations are written out here, independently of the casbin
policy, and the test fails for any route registered in the app that has no row."""

from __future__ import annotations

import itertools
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.authz.require import PermissionFirstRoute
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

ROLES = ("system_admin", "tenant_admin", "tenant_operator", "tenant_viewer", "executor")
ADMINS = {"system_admin", "tenant_admin"}
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/api/v1/auth/login"), ("GET", "/api/v1/auth/callback")}
# Not RBAC: DLW_API_DOCS decides (public, any valid token, or absent); tests/api/test_api_docs.py.
DOCS = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")}


@dataclass
class World:
    """Two tenants, each with the objects the routes address."""

    ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    db: MigratedDb | None = None

    def fresh_task(self, tenant: str) -> str:
        assert self.db is not None
        with self.db.owner() as conn:
            return str(conn.execute(*_task_sql(self.ids[tenant]["tenant_id"])).fetchone()[0])

    def fresh_failed_task(self, tenant: str) -> dict[str, str]:
        """A failed task with one failed file (what POST /tasks/{id}/retry re-queues)."""
        assert self.db is not None
        tid = self.ids[tenant]["tenant_id"]
        with self.db.owner() as conn:
            task = conn.execute(*_task_sql(tid)).fetchone()[0]
            conn.execute(
                "INSERT INTO dlw.task_files (tenant_id, task_id, path, size) VALUES (%s, %s, 'a', 1)",
                (tid, task),
            )
            for status in ("running", "failed"):
                conn.execute("UPDATE dlw.tasks SET status = %s WHERE id = %s", (status, task))
            for status in ("assigned", "failed"):
                conn.execute("UPDATE dlw.task_files SET status = %s WHERE task_id = %s", (status, task))
        return {"task_id": str(task)}

    def fresh_deletion(self, tenant: str) -> str:
        """A queued deletion of a fresh task (written as the owner: the matrix is about the route)."""
        assert self.db is not None
        tid = self.ids[tenant]["tenant_id"]
        with self.db.owner() as conn:
            task = conn.execute(*_task_sql(tid)).fetchone()[0]
            return str(
                conn.execute(
                    "INSERT INTO dlw.task_deletions (tenant_id, task_id) VALUES (%s, %s) RETURNING id", (tid, task)
                ).fetchone()[0]
            )

    def hub_token_set(self, tenant: str) -> dict[str, str]:
        """Give the tenant a (stand-in) hub token, so a DELETE finds one; no path parameters."""
        assert self.db is not None
        with self.db.owner() as conn:
            conn.execute(
                "INSERT INTO dlw.hub_tokens (tenant_id, ciphertext) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (self.ids[tenant]["tenant_id"], b"\x01" + secrets.token_bytes(40)),
            )
        return {}

    def fresh_service_account(self, tenant: str) -> str:
        assert self.db is not None
        with self.db.owner() as conn:
            return str(
                conn.execute(
                    "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
                    " VALUES (%s, 'https://idp', %s, 'tenant_viewer') RETURNING id",
                    (self.ids[tenant]["tenant_id"], secrets.token_hex(6)),
                ).fetchone()[0]
            )


def _task_sql(tenant_id: int) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
        " SELECT %s, p.id, s.id, 'org/model', 'main' FROM dlw.projects p, dlw.storage_targets s"
        " WHERE p.tenant_id = %s AND s.tenant_id = %s AND p.is_default AND s.name = 'default' RETURNING id",
        (tenant_id, tenant_id, tenant_id),
    )


def _tenant_body(_w: World, _t: str) -> dict[str, Any]:
    return {"slug": "t-" + secrets.token_hex(4), "display_name": "Matrix"}


@dataclass(frozen=True)
class Expect:
    allowed: frozenset[str]
    ok: int
    other: int | None = None  # status for an allowed role addressing the other tenant's object; None: no object
    path_ids: Callable[[World, str], dict[str, str]] = lambda w, t: {}
    body: Callable[[World, str], dict[str, Any]] | None = None


def ids(**keys: str) -> Callable[[World, str], dict[str, str]]:
    return lambda w, t: {param: str(w.ids[t][key]) for param, key in keys.items()}


EVERYONE = frozenset(ROLES)
ADMIN = frozenset(ADMINS)
SYSTEM = frozenset({"system_admin"})
WRITERS = frozenset({"system_admin", "tenant_admin", "tenant_operator"})
READERS = frozenset({"system_admin", "tenant_admin", "tenant_operator", "tenant_viewer"})

MATRIX: dict[tuple[str, str], Expect] = {
    ("GET", "/api/v1/auth/me"): Expect(EVERYONE, 200),
    ("POST", "/api/v1/tenants"): Expect(SYSTEM, 201, body=_tenant_body),
    ("GET", "/api/v1/tenants"): Expect(SYSTEM, 200),
    ("GET", "/api/v1/tenants/{tenant_id}"): Expect(SYSTEM, 200, other=200, path_ids=ids(tenant_id="tenant_id")),
    ("PATCH", "/api/v1/tenants/{tenant_id}"): Expect(
        SYSTEM, 200, other=200, path_ids=ids(tenant_id="tenant_id"), body=lambda w, t: {"display_name": "Renamed"}
    ),
    ("GET", "/api/v1/users"): Expect(ADMIN, 200),
    ("PATCH", "/api/v1/users/{user_id}"): Expect(
        ADMIN, 200, other=404, path_ids=ids(user_id="viewer_user"), body=lambda w, t: {"role": "tenant_viewer"}
    ),
    ("GET", "/api/v1/service-accounts"): Expect(ADMIN, 200),
    ("POST", "/api/v1/service-accounts"): Expect(
        ADMIN, 201, body=lambda w, t: {"client_id": "c-" + secrets.token_hex(4), "role": "tenant_viewer"}
    ),
    ("DELETE", "/api/v1/service-accounts/{account_id}"): Expect(
        ADMIN, 204, other=404, path_ids=lambda w, t: {"account_id": w.fresh_service_account(t)}
    ),
    ("GET", "/api/v1/audit"): Expect(ADMIN, 200),
    ("POST", "/api/v1/tasks"): Expect(
        WRITERS,
        201,
        body=lambda w, t: {"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 1}]},
    ),
    ("GET", "/api/v1/tasks"): Expect(READERS, 200),
    ("GET", "/api/v1/tasks/{task_id}"): Expect(READERS, 200, other=404, path_ids=ids(task_id="task")),
    ("POST", "/api/v1/tasks/{task_id}/cancel"): Expect(
        WRITERS, 202, other=404, path_ids=lambda w, t: {"task_id": w.fresh_task(t)}
    ),
    ("POST", "/api/v1/tasks/{task_id}/retry"): Expect(WRITERS, 202, other=404, path_ids=World.fresh_failed_task),
    ("DELETE", "/api/v1/tasks/{task_id}"): Expect(WRITERS, 202, other=404, path_ids=World.fresh_failed_task),
    ("GET", "/api/v1/quota/current"): Expect(READERS, 200),
    ("GET", "/api/v1/storage-targets"): Expect(READERS, 200),
    ("POST", "/api/v1/storage-targets"): Expect(ADMIN, 201, body=lambda w, t: {"name": "t-" + secrets.token_hex(4)}),
    ("GET", "/api/v1/hub-token"): Expect(ADMIN, 200),
    ("PUT", "/api/v1/hub-token"): Expect(ADMIN, 200, body=lambda w, t: {"token": "hf_matrix"}),
    ("DELETE", "/api/v1/hub-token"): Expect(ADMIN, 204, path_ids=lambda w, t: w.hub_token_set(t)),
    # Executor routes: only executors pass RBAC. The matrix's executor token is limited to tenant a:
    # with a made-up assignment token its own tenant's file is LEASE_LOST (409, the route ran and
    # checked the lease), and the other tenant's file does not exist for it (404).
    ("POST", "/api/v1/executor/claim"): Expect(
        frozenset({"executor"}), 200, body=lambda w, t: {"max_files": 1, "lease_seconds": 60}
    ),
    ("POST", "/api/v1/executor/reports"): Expect(
        frozenset({"executor"}), 200, body=lambda w, t: {"completions": [], "heartbeats": []}
    ),
    **{
        ("POST", f"/api/v1/executor/files/{{file_id}}/{action}"): Expect(
            frozenset({"executor"}),
            409,
            other=404,
            path_ids=lambda w, t: {
                "file_id": str(
                    w.db.owner()
                    .execute(
                        "INSERT INTO dlw.task_files (tenant_id, task_id, path, size)"
                        " VALUES (%s, %s, gen_random_uuid()::text, 1) RETURNING id",
                        (w.ids[t]["tenant_id"], w.ids[t]["task"]),
                    )
                    .fetchone()[0]
                )
            },
            body=lambda w, t, extra=extra: {"assignment_token": str(uuid.uuid4()), **extra},
        )
        for action, extra in (
            ("heartbeat", {"bytes_done": 0}),
            ("complete", {"bytes": 1, "sha256": "0" * 64}),
            ("fail", {"error": "matrix", "retryable": True}),
            ("release", {}),
        )
    },
    # Deletions as files: a made-up token on the tenant's own deletion is LEASE_LOST, the other
    # tenant's deletion does not exist for this executor.
    ("POST", "/api/v1/executor/deletions/claim"): Expect(
        frozenset({"executor"}), 200, body=lambda w, t: {"max_deletions": 1, "lease_seconds": 60}
    ),
    **{
        ("POST", f"/api/v1/executor/deletions/{{deletion_id}}/{action}"): Expect(
            frozenset({"executor"}),
            409,
            other=404,
            path_ids=lambda w, t: {"deletion_id": w.fresh_deletion(t)},
            body=lambda w, t, extra=extra: {"assignment_token": str(uuid.uuid4()), **extra},
        )
        for action, extra in (("heartbeat", {}), ("complete", {}), ("fail", {"error": "matrix", "retryable": True}))
    },
}


@pytest.fixture(scope="module")
def world(db: MigratedDb) -> World:
    w = World(db=db)
    for name in ("a", "b"):
        tid = tenant(db, f"matrix-{name}", name=name)
        with db.owner() as conn:
            viewer = conn.execute(
                "INSERT INTO dlw.users (tenant_id, issuer, subject, role) VALUES (%s, 'https://idp', %s,"
                " 'tenant_viewer') RETURNING id",
                (tid, f"viewer-{name}"),
            ).fetchone()[0]
            task = conn.execute(*_task_sql(tid)).fetchone()[0]
            conn.execute("UPDATE dlw.tenants SET quota_concurrent = 0 WHERE tenant_id = %s", (tid,))
            w.ids[name] = {"tenant_id": tid, "viewer_user": viewer, "task": task}
    return w


@pytest.fixture(scope="module")
def client(db: MigratedDb, world: World) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, oidc_issuer="https://idp"))) as c:
        yield c


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, also inside included routers (FastAPI keeps those nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def registered_routes(client: TestClient) -> set[tuple[str, str]]:
    return {(method, route.path) for route in api_routes(client.app.routes) for method in route.methods}  # type: ignore[attr-defined]


def test_every_registered_route_has_a_matrix_row(client: TestClient):
    assert registered_routes(client) - PUBLIC - DOCS == set(MATRIX), "add the new route to MATRIX"


def test_every_non_public_route_declares_a_permission(client: TestClient):
    for route in api_routes(client.app.routes):  # type: ignore[attr-defined]
        if all((m, route.path) in PUBLIC | DOCS for m in route.methods):
            continue
        declared = [d.call.dlw_permission for d in route.dependant.dependencies if hasattr(d.call, "dlw_permission")]
        assert len(declared) == 1, route.path
        obj, act = declared[0]
        assert obj == route.path and {act} == route.methods, route.path
        assert isinstance(route, PermissionFirstRoute), f"{route.path}: authorize before the body is read"


CASES = [
    (m, p, role, where)
    for (m, p), role, where in itertools.product(MATRIX, ROLES, ("same", "other"))
    if where == "same" or MATRIX[(m, p)].other is not None
]


@pytest.mark.parametrize(("method", "path", "role", "where"), CASES, ids=[f"{m} {p} {r} {w}" for m, p, r, w in CASES])
def test_route_role_tenant(client: TestClient, world: World, method: str, path: str, role: str, where: str):
    expect = MATRIX[(method, path)]
    target = "a" if where == "same" else "b"
    url = path.format(**expect.path_ids(world, target))
    body = expect.body(world, target) if expect.body else None
    principal_token = token(world.ids["a"]["tenant_id"], role, user_id=f"matrix-{role}")
    response = client.request(method, url, headers=bearer(principal_token), json=body)
    if role not in expect.allowed:
        assert response.status_code == 403, response.text
        assert response.json()["detail"]["code"] == "RBAC_DENIED"
    else:
        wanted = expect.ok if where == "same" else expect.other
        assert response.status_code == wanted, response.text


def test_an_unknown_id_and_another_tenants_id_look_the_same(client: TestClient, world: World):
    admin = bearer(token(world.ids["a"]["tenant_id"], "tenant_admin"))
    theirs = client.patch(
        f"/api/v1/users/{world.ids['b']['viewer_user']}", headers=admin, json={"role": "tenant_viewer"}
    )
    nowhere = client.patch(f"/api/v1/users/{uuid.uuid4()}", headers=admin, json={"role": "tenant_viewer"})
    assert theirs.status_code == nowhere.status_code == 404
    assert theirs.json() == nowhere.json() and nowhere.json()["detail"]["code"] == "USER_NOT_FOUND"
