"""Hostile input through the real app: every case is a 4xx with a stable code in the one error
shape {"detail": {"code", "message", ...}}, never a 5xx or a trace."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.api.routes import tasks
from tests.support.app import ADMIN_TOKEN, app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.tenants import tenant

SYSTEM = bearer(ADMIN_TOKEN)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(db: MigratedDb) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings(db, auth_dev_mode=True))) as c:
        yield c


@pytest.fixture(scope="module")
def op(db: MigratedDb) -> dict[str, str]:
    return bearer(token(tenant(db, "hostile"), "tenant_operator"))


@pytest.fixture(scope="module")
def admin(db: MigratedDb) -> dict[str, str]:
    return bearer(token(tenant(db, "hostile-admin"), "tenant_admin"))


def task(**overrides: Any) -> dict[str, Any]:
    return {"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 10}], **overrides}


def refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["detail"] and body["detail"]["code"] == code, body
    assert isinstance(body["detail"]["message"], str) and body["detail"]["message"]
    return dict(body["detail"])


def raw_task(client: TestClient, headers: dict[str, str], text: str) -> Any:
    return client.post("/api/v1/tasks", headers=headers | JSON, content=text.encode("utf-8", "surrogatepass"))


BASE = '{"repo_id": "org/model", "revision": "main", "files": [{"path": "a.bin", "size": 10}]'


# -- 1: unencodable and out-of-range input ---------------------------------------------------
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", '"\\ud800"', "-1e400"])
@pytest.mark.parametrize("where", ["priority", "unknown_key"])
def test_non_finite_numbers_and_lone_surrogates_are_invalid_json(client, op, value: str, where: str):
    response = raw_task(client, op, BASE + f', "{where}": {value}}}')
    detail = refused(response, 422, "INVALID_JSON")
    assert "ud800" not in json.dumps(detail) and "Infinity" not in response.text.split("message")[0]


@pytest.mark.parametrize("value", ["NaN", "1e400", '"\\ud800"'])
def test_the_same_inside_a_nested_config_or_a_file(client, op, admin, value: str):
    refused(raw_task(client, op, BASE[:-1] + f', {{"path": "b", "size": {value}}}]}}'), 422, "INVALID_JSON")
    target = f'{{"name": "t1", "config": {{"a": [{{"b": {value}}}]}}}}'
    response = client.post("/api/v1/storage-targets", headers=admin | JSON, content=target.encode())
    refused(response, 422, "INVALID_JSON")


def test_a_raw_lone_surrogate_byte_sequence_is_invalid_json(client, op):
    refused(raw_task(client, op, BASE + ', "x": "\ud800"}'), 422, "INVALID_JSON")


def test_nul_in_any_string_field_is_422(client, op):
    for body in (task(repo_id="org/mo\x00del"), task(revision="ma\x00in"), task(files=[{"path": "a\x00", "size": 1}])):
        detail = refused(client.post("/api/v1/tasks", headers=op, json=body), 422, "VALIDATION_FAILED")
        assert detail["errors"][0]["type"] == "string_nul"
    refused(client.post("/api/v1/tasks", headers=op, json=task(**{"unknown\x00": 1})), 422, "VALIDATION_FAILED")


def test_nul_in_a_storage_target_config_is_422(client, admin):
    for config in ({"a": "\x00"}, {"a": {"b": ["x\x00y"]}}, {"\x00": 1}):
        response = client.post("/api/v1/storage-targets", headers=admin, json={"name": "nul-target", "config": config})
        refused(response, 422, "VALIDATION_FAILED")


def test_nul_in_a_query_parameter_or_the_dev_login_email_is_422(client, op, admin):
    refused(client.get("/api/v1/tasks", headers=op, params={"status": "pend\x00ing"}), 422, "VALIDATION_FAILED")
    refused(client.get("/api/v1/tasks?cursor=%00", headers=op), 422, "VALIDATION_FAILED")
    refused(client.get("/api/v1/audit", headers=admin, params={"action": "a\x00"}), 422, "VALIDATION_FAILED")
    response = client.get("/api/v1/auth/login", params={"email": "a\x00@acme.test"}, follow_redirects=False)
    refused(response, 422, "VALIDATION_FAILED")


@pytest.mark.parametrize("tenant_id", ["9223372036854775808", "-9223372036854775809", "99999999999999999999"])
def test_path_ids_beyond_bigint_are_422(client, tenant_id: str):
    refused(client.get(f"/api/v1/tenants/{tenant_id}", headers=SYSTEM), 422, "VALIDATION_FAILED")
    response = client.patch(f"/api/v1/tenants/{tenant_id}", headers=SYSTEM, json={"display_name": "x"})
    refused(response, 422, "VALIDATION_FAILED")


def test_the_largest_bigint_path_id_is_an_ordinary_404(client):
    refused(client.get("/api/v1/tenants/9223372036854775807", headers=SYSTEM), 404, "TENANT_NOT_FOUND")


@pytest.mark.parametrize(
    "query", ["after_id=99999999999999999999", "after_id=9223372036854775808", "limit=99999999999999999999"]
)
def test_query_integers_beyond_bigint_are_422(client, query: str):
    refused(client.get(f"/api/v1/tenants?{query}", headers=SYSTEM), 422, "VALIDATION_FAILED")


def test_body_integers_beyond_bigint_are_422(client, op):
    refused(client.post("/api/v1/tasks", headers=op, json=task(priority=1 << 64)), 422, "VALIDATION_FAILED")
    body = {"slug": "big-quota", "display_name": "x", "quota_bytes_month": 1 << 70}
    refused(client.post("/api/v1/tenants", headers=SYSTEM, json=body), 422, "VALIDATION_FAILED")


def test_total_bytes_beyond_bigint_is_422(client, op):
    # A file may declare at most MAX_FILE_SIZE bytes, so no task of MAX_FILES files totals more
    # than a bigint (the OpenAPI document says so too): 1,025 files of 2^53 bytes are refused.
    files = [{"path": f"f{i}", "size": 1 << 53} for i in range(1025)]
    detail = refused(client.post("/api/v1/tasks", headers=op, json=task(files=files)), 422, "VALIDATION_FAILED")
    assert ["body", "files", 0, "size"] in [error["loc"] for error in detail["errors"]]
    largest = [{"path": f"f{i}", "size": tasks.MAX_FILE_SIZE} for i in range(tasks.MAX_FILES)]
    assert sum(f["size"] for f in largest) <= (1 << 63) - 1
    fitting = client.post("/api/v1/tasks", headers=op, json=task(files=largest))  # admission decides
    assert fitting.status_code in (201, 429), fitting.text


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


NESTED = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        cursor_of([1, 2]),
        cursor_of({"a": 1, "b": 2}),
        cursor_of(["2024-01-01T00:00:00+00:00"]),
        cursor_of([None, None]),
        cursor_of(["2024-01-01T00:00:00+00:00", 5]),
        cursor_of(["2024-01-01T00:00:00+00:00", "not-a-uuid"]),
        cursor_of("just a string"),
        cursor_of(["0001-01-01T00:00:00+14:00", "00000000-0000-0000-0000-000000000000"]),
        cursor_of(["9999-12-31T23:59:59-14:00", "00000000-0000-0000-0000-000000000000"]),
        cursor_of(["2024-01-01T00:00:00", "00000000-0000-0000-0000-000000000000"]),
        NESTED,
        "!!!",
        "A" * 10_000,
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_hand_made_cursors_are_invalid_cursor(client, op, admin, cursor: str):
    refused(client.get("/api/v1/tasks", headers=op, params={"cursor": cursor}), 422, "INVALID_CURSOR")
    refused(client.get("/api/v1/users", headers=admin, params={"cursor": cursor}), 422, "INVALID_CURSOR")
    refused(client.get("/api/v1/audit", headers=admin, params={"cursor": cursor}), 422, "INVALID_CURSOR")


def test_an_issued_cursor_still_pages(client, op):
    for index in range(3):
        assert client.post("/api/v1/tasks", headers=op, json=task(revision=f"r{index}")).status_code == 201
    first = client.get("/api/v1/tasks", headers=op, params={"limit": 1}).json()
    assert first["next_cursor"]
    second = client.get("/api/v1/tasks", headers=op, params={"limit": 1, "cursor": first["next_cursor"]})
    assert second.status_code == 200 and second.json()["items"][0]["id"] != first["items"][0]["id"]


# -- 2: strict input --------------------------------------------------------------------------
def test_duplicate_keys_are_refused(client, op, admin):
    refused(raw_task(client, op, BASE + ', "priority": 1, "priority": 2}'), 422, "DUPLICATE_KEY")
    refused(raw_task(client, op, BASE[:-1] + ', {"path": "b", "size": 1, "size": 2}]}'), 422, "DUPLICATE_KEY")
    target = '{"name": "dup", "config": {"a": 1, "a": 2}}'
    response = client.post("/api/v1/storage-targets", headers=admin | JSON, content=target.encode())
    refused(response, 422, "DUPLICATE_KEY")


@pytest.mark.parametrize(
    "overrides",
    [
        {"priority": "5"},
        {"priority": 5.0},
        {"priority": True},
        {"files": [{"path": "a", "size": "10"}]},
        {"files": [{"path": "a", "size": 10.0}]},
        {"files": [{"path": "a", "size": False}]},
        {"repo_id": 5},
    ],
)
def test_no_type_coercion_in_task_bodies(client, op, overrides: dict[str, Any]):
    refused(client.post("/api/v1/tasks", headers=op, json=task(**overrides)), 422, "VALIDATION_FAILED")


def test_no_type_coercion_in_admin_and_executor_bodies(client):
    response = client.patch("/api/v1/tenants/1", headers=SYSTEM, json={"active": 0})
    refused(response, 422, "VALIDATION_FAILED")
    response = client.patch("/api/v1/tenants/1", headers=SYSTEM, json={"quota_concurrent": "5"})
    refused(response, 422, "VALIDATION_FAILED")


def test_uuid_strings_are_still_accepted(client, op):
    response = client.post(
        "/api/v1/tasks", headers=op, json=task(revision="uuid", project_id="00000000-0000-0000-0000-000000000000")
    )
    refused(response, 422, "UNKNOWN_PROJECT")  # parsed as a UUID, then refused by the database


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_of_another_media_type_is_415_without_echo(client, op, content_type: str | None):
    secret = BASE + ', "echo-me-not": 1}'
    headers = op | ({"Content-Type": content_type} if content_type else {})
    response = client.post("/api/v1/tasks", headers=headers, content=secret.encode())
    refused(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert "echo-me-not" not in response.text


def test_json_with_a_charset_is_accepted(client, op):
    response = client.post(
        "/api/v1/tasks",
        headers=op | {"Content-Type": "application/json; charset=utf-8"},
        content=json.dumps(task(revision="charset")).encode(),
    )
    assert response.status_code == 201, response.text


def test_a_405_lists_every_method_of_the_path(client, op):
    response = client.delete("/api/v1/tasks", headers=op)
    refused(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST"}
    response = client.put("/api/v1/tenants/1", headers=SYSTEM, json={})
    refused(response, 405, "METHOD_NOT_ALLOWED")
    assert set(response.headers["Allow"].split(", ")) == {"GET", "PATCH"}


# -- 3: one error shape -----------------------------------------------------------------------
def test_every_kind_of_error_has_the_one_shape(client, op, db):
    refused(client.get("/api/v1/nowhere"), 404, "ROUTE_NOT_FOUND")
    refused(client.get("/api/v1/tasks/"), 404, "ROUTE_NOT_FOUND")
    refused(client.get("/api/v1/tasks"), 401, "UNAUTHENTICATED")
    refused(client.get("/api/v1/tenants", headers=op), 403, "RBAC_DENIED")
    refused(raw_task(client, op, "{not json"), 422, "INVALID_JSON")
    refused(raw_task(client, op, '"\\u00'), 422, "INVALID_JSON")
    detail = refused(client.post("/api/v1/tasks", headers=op, json={"repo_id": "x"}), 422, "VALIDATION_FAILED")
    assert all(set(error) == {"loc", "msg", "type"} for error in detail["errors"])
    refused(client.get("/api/v1/tasks/not-a-uuid", headers=op), 422, "VALIDATION_FAILED")
    big = b'{"x": "' + b"a" * (16 * 1024 * 1024 + 1) + b'"}'
    refused(client.post("/api/v1/tasks", headers=op | JSON, content=big), 413, "BODY_TOO_LARGE")
