"""/metrics, scraped and parsed by prometheus_client's own text parser: requests by route template,
admissions by outcome and metric, queue and leases by state from SQL, lease expiries, snapshot age
and leadership, pool usage; access fails closed (no route by default, the system_admin token on
the API port, or a listener of its own), and tenant labels appear only when allowed, capped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.factory import create_app
from tests.support import server
from tests.support.app import ADMIN_TOKEN, app_settings, bearer, token
from tests.support.database import MigratedDb, free_port
from tests.support.tenants import UNLIMITED, tenant

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics", headers=bearer(ADMIN_TOKEN))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture(autouse=True)
def empty_queue(db: MigratedDb) -> None:
    with db.owner() as conn:
        conn.execute(
            "UPDATE dlw.task_files SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL"
            " WHERE status IN ('pending', 'assigned', 'running')"
        )
        conn.execute("UPDATE dlw.tasks SET status = 'cancelled' WHERE status IN ('pending', 'running')")


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    settings = app_settings(db, metrics_access="token", metrics_cache_seconds=0.001)
    with TestClient(create_app(settings)) as c:
        yield c


def create(client: TestClient, tid: int, files: list[dict[str, Any]]) -> httpx.Response:
    body = {"repo_id": "org/model", "revision": "v1", "files": files}
    return client.post("/api/v1/tasks", headers=bearer(token(tid, "tenant_operator")), json=body)


def test_requests_admissions_queue_leases_and_pool(client: TestClient, db: MigratedDb):
    tid = tenant(db, "metrics-a", concurrent=2, bytes_month=0, storage_gb=0)
    before = scrape(client)
    assert create(client, tid, [{"path": "a", "size": 10}, {"path": "b", "size": 20}]).status_code == 201
    assert create(client, tid, [{"path": "c", "size": 5}]).status_code == 201
    refused = create(client, tid, [{"path": "d", "size": 5}])
    assert refused.status_code == 429
    executor = bearer(token(0, "executor", "metrics-executor"))
    claimed = client.post("/api/v1/executor/claim", headers=executor, json={"max_files": 1, "lease_seconds": 30})
    assert claimed.status_code == 200 and len(claimed.json()["files"]) == 1
    task_id = "00000000-0000-0000-0000-000000000000"
    assert client.get(f"/api/v1/tasks/{task_id}", headers=bearer(token(tid, "tenant_viewer"))).status_code == 404
    assert client.get("/no/such/route").status_code == 404

    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/api/v1/tasks"
    assert grew("dlw_http_requests_total", route=route, method="POST", status="201") == 2
    assert grew("dlw_http_requests_total", route=route, method="POST", status="429") == 1
    # Route templates, never raw paths: the unknown id and the unknown route add no new series.
    assert grew("dlw_http_requests_total", route="/api/v1/tasks/{task_id}", method="GET", status="404") == 1
    assert grew("dlw_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert not any("00000000" in str(labels) or "/no/such" in str(labels) for _, labels in after)
    assert grew("dlw_http_request_duration_seconds_count", route=route, method="POST") == 3
    assert grew("dlw_admissions_total", outcome="created", metric="") == 2
    assert grew("dlw_admissions_total", outcome="QUOTA_EXCEEDED", metric="concurrent_tasks") == 1
    # From SQL (dlw.platform_metrics): 3 files, one of them claimed; no tenant label by default.
    assert value(after, "dlw_queue_files", state="pending", tenant="") == 2
    assert value(after, "dlw_queue_files", state="assigned", tenant="") == 1
    assert value(after, "dlw_leases", state="live") == 1
    assert value(after, "dlw_leases", state="expired") == 0
    assert not any(dict(labels).get("tenant") for _, labels in after)
    assert value(after, "dlw_db_pool_connections", state="max") == 4
    assert ("dlw_snapshot_leader", ()) in after
    assert ("dlw_lease_expiries_total", ()) in after


def test_lease_expiries_are_counted_by_the_sweep(client: TestClient, db: MigratedDb):
    tid = tenant(db, "metrics-exp", **UNLIMITED)
    assert create(client, tid, [{"path": "x", "size": 1}]).status_code == 201
    executor = bearer(token(0, "executor", "metrics-sweeper"))
    assert client.post("/api/v1/executor/claim", headers=executor, json={"max_files": 1}).json()["files"]
    with db.owner() as conn:
        conn.execute(
            "UPDATE dlw.task_files SET lease_expires_at = now() - interval '1 minute' WHERE tenant_id = %s", (tid,)
        )
    before = scrape(client)
    assert value(before, "dlw_leases", state="expired") == 1
    client.post("/api/v1/executor/claim", headers=executor, json={"max_files": 1})  # every claim sweeps first
    after = scrape(client)
    assert value(after, "dlw_lease_expiries_total") - value(before, "dlw_lease_expiries_total") == 1


def test_access_fails_closed(db: MigratedDb):
    with TestClient(create_app(app_settings(db))) as default:
        assert default.get("/metrics", headers=bearer(ADMIN_TOKEN)).status_code == 404  # off: no such route
    with TestClient(create_app(app_settings(db, metrics_access="token"))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(token(0, "system_admin"))).status_code == 401  # the token only
        assert c.get("/metrics", headers=bearer(ADMIN_TOKEN + "x")).status_code == 401
        assert c.get("/metrics", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_tenant_labels_only_when_allowed_and_capped(db: MigratedDb):
    ids = [tenant(db, f"metrics-t{i}", **UNLIMITED) for i in range(3)]
    settings = app_settings(db, metrics_access="token", metrics_tenant_labels=2)
    with TestClient(create_app(settings)) as c:
        for n, tid in enumerate(ids):  # tenant i has i + 1 pending files
            files = [{"path": f"f{k}", "size": 1} for k in range(n + 1)]
            assert create(c, tid, files).status_code == 201
        samples = scrape(c)
    labelled = {dict(labels)["tenant"]: v for (name, labels), v in samples.items() if name == "dlw_queue_files"}
    assert labelled == {"metrics-t2": 3, "metrics-t1": 2, "": 1}  # the busiest two, the rest folded


def test_a_listener_of_its_own(db: MigratedDb):
    """DLW_METRICS_ACCESS=port: scraped on its own port; the API port has no /metrics."""
    metrics_port = free_port()
    bind = f"127.0.0.1:{metrics_port}"
    with server.running_server(db, DLW_METRICS_ACCESS="port", DLW_METRICS_BIND=bind) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 404
        response = httpx.get(f"http://{bind}/metrics", timeout=10)
        assert response.status_code == 200
        samples = parse(response.text)
        assert value(samples, "dlw_http_requests_total", route="/healthz", method="GET", status="200") >= 1
        assert ("dlw_lease_expiries_total", ()) in samples
