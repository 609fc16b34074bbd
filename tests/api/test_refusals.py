"""Refusals fail closed, database errors go through one SQLSTATE table, and the OpenAPI
document lists the codes of the registry."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.errors import ApiError
from app.api.factory import create_app
from app.api.refusals import REGISTRY, answer_of, found, specific_sqlstates
from app.api.sqlstates import DB_UNAVAILABLE, answer_for, answer_for_sqlstate
from app.db.queries import SQL
from tests.support.app import ADMIN_TOKEN, app_settings, bearer, token
from tests.support.database import MigratedDb


def status_and_detail(call: Any) -> tuple[int, Any]:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.status_code, info.value.detail


# -- the registry helper --------------------------------------------------------------------
def test_a_listed_success_is_returned_and_a_listed_refusal_raised():
    assert answer_of("dlw.cancel_task", "cancelled") == "cancelled"
    assert answer_of("dlw.executor_complete", {"outcome": "already_completed"}) == "already_completed"
    assert status_and_detail(lambda: answer_of("dlw.cancel_task", "TASK_TERMINAL")) == (
        409,
        {"code": "TASK_TERMINAL"},
    )
    # A refusal copies the columns it names from the result row.
    row = {"outcome": "QUOTA_EXCEEDED", "metric": "bytes_month", "task_id": None}
    assert status_and_detail(lambda: answer_of("dlw.create_task", row)) == (
        429,
        {"code": "QUOTA_EXCEEDED", "metric": "bytes_month"},
    )


@pytest.mark.parametrize("result", ["SOMETHING_NEW", "ok", "", None, {"outcome": None}, {"outcome": "REVIVED"}])
def test_an_unknown_outcome_is_a_500_and_logged_never_a_success(result: Any, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="dlw.api"):
        assert status_and_detail(lambda: answer_of("dlw.cancel_task", result)) == (500, {"code": "INTERNAL_ERROR"})
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "dlw.cancel_task" in errors[0].getMessage()


def test_a_missing_row_is_its_listed_refusal_or_a_500():
    assert status_and_detail(lambda: found("task_by_id", None)) == (404, {"code": "TASK_NOT_FOUND"})
    assert status_and_detail(lambda: found("insert_storage_target", None)) == (500, {"code": "INTERNAL_ERROR"})


def test_every_registry_entry_names_a_call_the_api_makes():
    called = {f for text in SQL.values() for f in re.findall(r"\b(dlw\.[a-z_]+)\(", text)}
    for key in REGISTRY:
        assert key in called if key.startswith("dlw.") else key in SQL, key
    # Every SQL function a route calls for an outcome is registered (the rest answer rows).
    assert called - set(REGISTRY) <= {
        "dlw.set_context",
        "dlw.audit",
        "dlw.audit_repeat",
        "dlw.ctx_tenant_id",
        "dlw.refresh_quota_snapshots",
        "dlw.hub_token_ciphertext",
        "dlw.hub_token_status",
        "dlw.platform_metrics",
    }
    codes = [(r.status, r.code) for answers in REGISTRY.values() for r in answers.all()]
    assert all(400 <= status < 600 and re.fullmatch(r"[A-Z][A-Z0-9_]+", code) for status, code in codes)


# -- the SQLSTATE table ---------------------------------------------------------------------
def test_the_sqlstate_table():
    expected = {
        "DLW01": (409, "ILLEGAL_TRANSITION"),
        "22023": (422, "INVALID_ARGUMENT"),
        "22P02": (422, "INVALID_ARGUMENT"),
        "22003": (422, "INVALID_ARGUMENT"),
        "23514": (422, "INVALID_ARGUMENT"),
        "P0002": (404, "NOT_FOUND"),
        "42501": (403, "DB_FORBIDDEN"),
        "55P03": (503, "LOCK_TIMEOUT"),
        "40001": (503, "DB_RETRY"),
        "40P01": (503, "DB_RETRY"),
        "08006": (503, "DB_UNAVAILABLE"),  # by its class 08
        "57P01": (503, "DB_UNAVAILABLE"),
    }
    for sqlstate, answer in expected.items():
        refusal = answer_for_sqlstate(sqlstate)
        assert refusal is not None and (refusal.status, refusal.code) == answer, sqlstate
    assert answer_for_sqlstate("XX000") is None and answer_for_sqlstate("P0001") is None
    assert answer_for(ConnectionRefusedError()) is DB_UNAVAILABLE and answer_for(ValueError()) is None


def test_a_call_answers_its_own_sqlstates_more_specifically():
    import asyncpg

    def lock_timeout(call: str) -> None:
        with specific_sqlstates(call):
            raise asyncpg.LockNotAvailableError("canceling statement due to lock timeout")

    assert status_and_detail(lambda: lock_timeout("dlw.create_task")) == (503, {"code": "QUOTA_LOCK_TIMEOUT"})
    with pytest.raises(asyncpg.LockNotAvailableError):  # others fall through to the general table
        lock_timeout("dlw.cancel_task")


# -- through the HTTP stack and a real database ---------------------------------------------
@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db))) as c:
        yield c


def replace_cancel_task(db: MigratedDb, body: str) -> None:
    """Stand-in for dlw.cancel_task in this module's own database (a clone of the template)."""
    with db.owner() as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION dlw.cancel_task(p_task_id uuid) RETURNS text LANGUAGE plpgsql VOLATILE"
            f" SET search_path = pg_catalog, pg_temp AS $fn$ BEGIN {body} END $fn$"
        )


@pytest.fixture(scope="module")
def operator(client: TestClient, db: MigratedDb) -> dict[str, str]:
    with db.owner() as conn:
        tid = conn.execute("SELECT dlw.provision_tenant('refusals', 'Refusals')").fetchone()[0]
    return bearer(token(tid, "tenant_operator"))


def new_task(client: TestClient, headers: dict[str, str]) -> str:
    files = [{"path": "a.bin", "size": 1}]
    created = client.post("/api/v1/tasks", headers=headers, json={"repo_id": "o/m", "revision": "r", "files": files})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def test_an_unknown_outcome_from_the_database_is_a_500_not_a_success(client, db, operator):
    task = new_task(client, operator)
    replace_cancel_task(db, "RETURN 'CANCELLED_MAYBE';")
    answer = client.post(f"/api/v1/tasks/{task}/cancel", headers=operator)
    assert answer.status_code == 500 and answer.json()["detail"]["code"] == "INTERNAL_ERROR"
    replace_cancel_task(db, "RETURN NULL;")
    answer = client.post(f"/api/v1/tasks/{task}/cancel", headers=operator)
    assert answer.status_code == 500 and answer.json()["detail"]["code"] == "INTERNAL_ERROR"


def test_database_errors_are_answered_through_the_sqlstate_table(client, db, operator):
    task = new_task(client, operator)
    # A real DLW01: the task state machine trigger refuses cancelled -> running.
    with db.owner() as conn:
        conn.execute("UPDATE dlw.tasks SET status = 'cancelled' WHERE id = %s", (task,))
    replace_cancel_task(db, "UPDATE dlw.tasks SET status = 'running' WHERE id = p_task_id; RETURN 'cancelled';")
    illegal = client.post(f"/api/v1/tasks/{task}/cancel", headers=operator)
    assert illegal.status_code == 409 and illegal.json()["detail"]["code"] == "ILLEGAL_TRANSITION"
    with db.owner() as conn:
        assert conn.execute("SELECT status FROM dlw.tasks WHERE id = %s", (task,)).fetchone() == ("cancelled",)
    # 22023 raised by SQL, as the functions do for a bad argument.
    replace_cancel_task(db, "RAISE EXCEPTION 'dlw.cancel_task: bad argument' USING ERRCODE = '22023';")
    invalid = client.post(f"/api/v1/tasks/{task}/cancel", headers=operator)
    assert invalid.status_code == 422 and invalid.json()["detail"]["code"] == "INVALID_ARGUMENT"
    assert "bad argument" not in invalid.text
    # Anything the table does not list is a 500 without the message.
    replace_cancel_task(db, "RAISE EXCEPTION 'secret internals';")
    other = client.post(f"/api/v1/tasks/{task}/cancel", headers=operator)
    assert other.status_code == 500 and other.json()["detail"]["code"] == "INTERNAL_ERROR"
    assert "secret" not in other.text


# -- the OpenAPI document -------------------------------------------------------------------
def codes(operation: dict[str, Any], status: int) -> set[str]:
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    schema = schema.get("anyOf", [schema])[0]
    return set(schema["properties"]["detail"]["properties"]["code"]["enum"])


def test_the_openapi_document_lists_the_registry_codes(client):
    paths = client.get("/openapi.json", headers=bearer(ADMIN_TOKEN)).json()["paths"]
    cancel = paths["/api/v1/tasks/{task_id}/cancel"]["post"]
    assert codes(cancel, 404) == {"TASK_NOT_FOUND"} and codes(cancel, 409) == {"TASK_TERMINAL"}
    assert "TASK_NOT_FOUND" in cancel["responses"]["404"]["description"]
    assert codes(cancel, 401) == {"UNAUTHENTICATED"} and codes(cancel, 403) == {"RBAC_DENIED", "DB_FORBIDDEN"}
    assert codes(cancel, 503) == {"DB_UNAVAILABLE", "COMMIT_UNCERTAIN"} and "422" in cancel["responses"]  # validation
    create = paths["/api/v1/tasks"]["post"]
    assert codes(create, 429) == {"QUOTA_EXCEEDED"}
    assert codes(create, 503) == {"DB_UNAVAILABLE", "COMMIT_UNCERTAIN", "QUOTA_LOCK_TIMEOUT", "HUB_UNAVAILABLE"}
    assert codes(create, 422) == {
        "UNKNOWN_PROJECT",
        "UNKNOWN_STORAGE_TARGET",
        "REPO_NOT_FOUND",
        "REVISION_NOT_FOUND",
        "HUB_ACCESS_DENIED",
        "EMPTY_SELECTION",
        "MANIFEST_MISMATCH",
        "MANIFEST_TOO_LARGE",
        "HF_CACHE_NEEDS_COMMIT",
    }
    assert "200" in create["responses"] and "201" in create["responses"]
    heartbeat = paths["/api/v1/executor/files/{file_id}/heartbeat"]["post"]
    assert codes(heartbeat, 409) == {"LEASE_LOST"} and "EXECUTOR_RETRY" in codes(heartbeat, 503)
