"""The OpenAPI document tells the truth (app/api/openapi_document.py): docs/openapi.json is
current, Spectral finds no error in it, and every operation documents its errors, security and
headers; what a route is (authenticated, takes a body, has a path parameter) is derived, so a
new route is documented from its one declaration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel

from app import domain
from app.api import openapi_document
from app.api.errors import Refusal
from app.api.openapi_errors import error_responses
from app.api.routes import administration, executor, storage_targets, tasks
from app.authz.require import PermissionFirstRoute, require_perm
from app.identity.principal import Principal
from app.ops.openapi_cli import COMMITTED, document, document_text
from tests.support.requirements import require

ROOT = Path(__file__).resolve().parents[2]
LINT_DIR = ROOT / "tests" / "openapi_lint"
SPECTRAL = LINT_DIR / "node_modules" / ".bin" / "spectral"
REGENERATE = "./run dlw openapi --output docs/openapi.json"
PUBLIC = {"getHealth", "getReadiness", "startLogin", "finishLogin"}
METHODS = ("get", "post", "put", "patch", "delete")
# The codes table of docs/errors.md: every documented (status, code) is explained there.
TABLE = {
    (int(status), code)
    for status, code in re.findall(r"^\| (\d{3}) \| `([A-Z0-9_]+)` \|", (ROOT / "docs/errors.md").read_text(), re.M)
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op) for path, item in doc["paths"].items() for method, op in item.items() if method in METHODS
    ]


def codes(op: dict[str, Any], status: int) -> set[str]:
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    assert schema["allOf"] == [{"$ref": "#/components/schemas/Error"}], schema
    return set(schema["properties"]["detail"]["properties"]["code"]["enum"])


def test_the_committed_document_is_current():
    committed = (ROOT / COMMITTED).read_text(encoding="utf-8")
    assert committed == document_text(), f"docs/openapi.json is stale: run {REGENERATE}"


def test_spectral_finds_no_error_and_no_warning(tmp_path: Path):
    missing = None if shutil.which("node") else "node is not installed"
    if not missing and not SPECTRAL.exists():
        missing = "tests/openapi_lint/node_modules is missing (./run test installs it with npm ci)"
    require(missing, "the Spectral lint of docs/openapi.json")
    ruleset = LINT_DIR / ".spectral.yaml"
    report = tmp_path / "spectral.json"
    command = [
        str(SPECTRAL),
        "lint",
        "--fail-severity=error",
        "--ruleset",
        str(ruleset),
        "-f",
        "json",
        "-o",
        str(report),
    ]
    result = subprocess.run([*command, str(COMMITTED)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    findings = json.loads(report.read_text() or "[]")
    by_severity = {name: sum(1 for f in findings if f["severity"] == n) for n, name in enumerate(SEVERITIES)}
    print("spectral lint --fail-severity=error docs/openapi.json:", by_severity)  # quoted in the docs
    assert result.returncode == 0, (result.stderr, findings)
    problems = [f"{f['code']} at {'.'.join(map(str, f['path']))}: {f['message']}" for f in findings]
    assert by_severity["error"] == 0 and by_severity["warning"] == 0, problems


SEVERITIES = ("error", "warning", "info", "hint")


def test_operations_have_meaningful_unique_ids(doc: dict[str, Any]):
    ids = [op["operationId"] for _m, _p, op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+[A-Z][A-Za-z]*|[a-z]+", i) for i in ids), ids
    for wanted in ("createTask", "listTasks", "getTask", "cancelTask", "claimFiles", "listAuditEntries"):
        assert wanted in ids


def test_security_is_declared_and_applied_per_operation(doc: dict[str, Any]):
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "Authorization: Bearer" in doc["info"]["description"] and "X-DLW-Tenant" in doc["info"]["description"]
    for method, path, op in operations(doc):
        names = [p["name"] for p in op.get("parameters", [])]
        if op["operationId"] in PUBLIC:
            assert op["security"] == [] and "401" not in op["responses"], (method, path)
            continue
        assert op["security"] == [{"bearer": []}], (method, path)
        assert codes(op, 401) == {"UNAUTHENTICATED"}, (method, path)
        assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
        assert {"RBAC_DENIED", "TENANT_HEADER_FORBIDDEN"} <= codes(op, 403), (method, path)
        assert "TENANT_NOT_FOUND" in codes(op, 404) and "X-DLW-Tenant" in names, (method, path)


def test_every_error_status_uses_the_one_shape_with_known_codes(doc: dict[str, Any]):
    for method, path, op in operations(doc):
        statuses = {int(s) for s in op["responses"]}
        assert 500 in statuses and any(s < 400 for s in statuses), (method, path)
        for status in (s for s in statuses if s >= 400):
            listed = codes(op, status)
            assert listed and {(status, code) for code in listed} <= TABLE, (method, path, status, listed)
            assert all(f"`{code}`" in op["responses"][str(status)]["description"] for code in listed)
        if method != "get":
            assert codes(op, 413) == {"BODY_TOO_LARGE"} and codes(op, 415) == {"UNSUPPORTED_MEDIA_TYPE"}
            assert {"INVALID_JSON", "DUPLICATE_KEY", "VALIDATION_FAILED"} <= codes(op, 422), (method, path)
        if "{" in path:
            assert "ROUTE_NOT_FOUND" in codes(op, 404) and codes(op, 405) == {"METHOD_NOT_ALLOWED"}
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "FieldError" in schemas


def integer_schemas(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [found for item in node for found in integer_schemas(item)]
    if not isinstance(node, dict):
        return []
    here = [node] if node.get("type") == "integer" else []
    return here + [found for value in node.values() for found in integer_schemas(value)]


def test_integer_bounds_are_published_as_integers(doc: dict[str, Any]):
    """As floats (FastAPI's model), 2**62 + 95 passed a validator comparing in floating point
    against `maximum: 4.611686018427388e+18`, and the API refused it: the fuzzer found it."""
    bounded = [schema for schema in integer_schemas(doc) if set(openapi_document.BOUNDS) & schema.keys()]
    assert len(bounded) >= 10
    for schema in bounded:
        assert all(type(schema[key]) is int for key in openapi_document.BOUNDS if key in schema), schema
    heartbeat = doc["components"]["schemas"]["HeartbeatBody"]["properties"]["checkpoint_bytes"]["anyOf"][0]
    assert heartbeat["maximum"] == 1 << 62
    assert not jsonschema_rs.validator_for(heartbeat).is_valid((1 << 62) + 95)


def test_retry_after_is_documented_where_it_is_sent(doc: dict[str, Any]):
    create = doc["paths"]["/api/v1/tasks"]["post"]
    assert "Retry-After" in create["responses"]["503"]["headers"]  # QUOTA_LOCK_TIMEOUT, DB_UNAVAILABLE
    assert "QUOTA_LOCK_TIMEOUT" in codes(create, 503) and codes(create, 429) == {"QUOTA_EXCEEDED"}
    assert "IDEMPOTENCY_CONFLICT" in codes(create, 409)
    idempotency = [p for p in create["parameters"] if p["name"] == "Idempotency-Key"]
    assert idempotency and idempotency[0]["in"] == "header" and idempotency[0]["description"]


def test_statuses_and_roles_are_enums_of_the_domain(doc: dict[str, Any]):
    schemas = doc["components"]["schemas"]

    def enum(model: str, field: str) -> list[Any]:
        return list(schemas[model]["properties"][field]["enum"])

    assert enum("Task", "status") == list(domain.TASK_STATUSES)
    assert enum("TaskFile", "status") == list(domain.FILE_STATUSES)
    assert enum("User", "role") == list(domain.TENANT_ROLES)
    assert enum("UserPatch", "role") == list(domain.TENANT_ROLES)
    assert enum("ServiceAccount", "role") == enum("ServiceAccountCreate", "role") == list(domain.SERVICE_ACCOUNT_ROLES)
    assert enum("Me", "role") == enum("LoginResult", "role") == list(domain.ROLES)
    assert enum("Report", "task_status") == [*domain.TASK_STATUSES, None]
    list_tasks = doc["paths"]["/api/v1/tasks"]["get"]["parameters"]
    status = next(p for p in list_tasks if p["name"] == "status")["schema"]["anyOf"][0]
    assert status["enum"] == list(domain.TASK_STATUSES)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("TaskCreate", tasks.TaskCreate),
        ("TenantCreate", administration.TenantCreate),
        ("TenantPatch", administration.TenantPatch),
        ("UserPatch", administration.UserPatch),
        ("ServiceAccountCreate", administration.ServiceAccountCreate),
        ("StorageTargetCreate", storage_targets.StorageTargetCreate),
        ("ClaimRequest", executor.ClaimRequest),
    ],
)
def test_the_main_requests_have_examples_the_api_accepts(doc: dict[str, Any], name: str, model: type[BaseModel]):
    examples = doc["components"]["schemas"][name]["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)  # strict, as the API reads it


def test_tags_are_described(doc: dict[str, Any]):
    described = {tag["name"] for tag in doc["tags"] if tag["description"]}
    assert {tag for _m, _p, op in operations(doc) for tag in op["tags"]} <= described


class Widget(BaseModel):
    name: str


def test_a_new_route_is_documented_from_its_one_declaration():
    """What another route added later gets without writing anything but its own refusals."""
    gone = Refusal(409, "WIDGET_GONE", "the widget went away")
    router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)

    @router.post("/widgets/{widget_id}/poke", responses=error_responses(gone))
    async def poke_widget(
        request: Request,
        widget_id: int,
        body: Widget,
        principal: Principal = Depends(require_perm("/api/v1/widgets/{widget_id}/poke", "POST")),
    ) -> None:
        """Poke a widget."""

    @router.get("/widgets", responses=error_responses(authenticated=False, database=False))
    async def list_widgets() -> list[str]:
        """Public widgets."""
        return []

    app = FastAPI(generate_unique_id_function=openapi_document.operation_id)
    app.include_router(router)
    paths = openapi_document.build(app)["paths"]
    poke = paths["/api/v1/widgets/{widget_id}/poke"]["post"]
    assert poke["operationId"] == "pokeWidget" and poke["security"] == [{"bearer": []}]
    assert codes(poke, 409) == {"WIDGET_GONE"} and codes(poke, 401) == {"UNAUTHENTICATED"}
    assert codes(poke, 415) == {"UNSUPPORTED_MEDIA_TYPE"} and codes(poke, 413) == {"BODY_TOO_LARGE"}
    assert {"DB_FORBIDDEN", "RBAC_DENIED"} <= codes(poke, 403) and "DB_UNAVAILABLE" in codes(poke, 503)
    assert codes(poke, 405) == {"METHOD_NOT_ALLOWED"} and "X-DLW-Tenant" in [p["name"] for p in poke["parameters"]]
    listing = paths["/api/v1/widgets"]["get"]
    assert listing["security"] == [] and sorted(listing["responses"]) == ["200", "422", "500"]
    assert codes(listing, 422) == {"VALIDATION_FAILED"}  # a NUL in any query parameter
