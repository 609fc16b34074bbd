"""A server that stops taking writes under the API's pooled connections (a standby, or a node
pg_auto_failover fences with default_transaction_read_only while it promotes or demotes; see
tests/e2e/test_failover.py for the real failover): writes answer 503 DB_UNAVAILABLE with
Retry-After, never 500, and the connection is dropped, so that the API writes again as soon as
the server does, without a restart (a read-only session would otherwise stay in the pool)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from app.api.factory import create_app
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

BODY = {"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 10}]}


@pytest.fixture
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, db_pool_min_size=1, db_pool_max_size=1))) as c:
        yield c


def api_backends(db: MigratedDb) -> set[int]:
    with db.owner() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'dlw-api'"
        ).fetchall()
    return {r[0] for r in rows}


def test_writes_on_a_read_only_server_answer_503_and_recover_by_themselves(client: TestClient, db: MigratedDb):
    op = bearer(token(tenant(db, "read-only-server"), "tenant_operator"))
    assert client.post("/api/v1/tasks", headers=op, json=BODY).status_code == 201
    database = sql.Identifier(db.name)
    try:
        db.server.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database))
        with db.owner() as conn:  # the pool's next connection starts read-only
            conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (list(api_backends(db)),))
        refused = client.post("/api/v1/tasks", headers=op, json=BODY)
        assert refused.status_code == 503, refused.text
        assert refused.json()["detail"]["code"] == "DB_UNAVAILABLE" and refused.headers.get("Retry-After")
        read_only_sessions = api_backends(db)
    finally:
        db.server.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(database))
    # A client retrying as told: each refusal replaced the pool's connections (the replacement
    # for the last one may have been opened before the server took writes again).
    answers = []
    for _ in range(5):
        answers.append(client.post("/api/v1/tasks", headers=op, json=BODY).status_code)
        if answers[-1] == 201:
            break
        time.sleep(0.2)
    assert answers[-1] == 201 and len(answers) <= 2, answers
    assert not (api_backends(db) & read_only_sessions), "the read-only session stayed in the pool"
