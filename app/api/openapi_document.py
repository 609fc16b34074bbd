"""The OpenAPI document: FastAPI's, completed from what each route is.

FastAPI documents the request and success shapes. This adds what a client generator needs and
FastAPI cannot know: every error answer of every operation (declared by the route, the rest
derived from it: app/api/openapi_errors.py), the bearer security scheme applied per operation
(public ones carry `security: []`), the X-DLW-Tenant header, operationIds, tag descriptions
and how to authenticate. The committed copy is docs/openapi.json (`./run dlw openapi --output
docs/openapi.json`); tests/api/test_openapi_document.py keeps it current and lints it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, routing
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext
from pydantic import Field

from app.api.errors import (
    BODY_TOO_LARGE,
    DB_UNAVAILABLE,
    DUPLICATE_KEY,
    INTERNAL_ERROR,
    INVALID_JSON,
    METHOD_NOT_ALLOWED,
    RBAC_DENIED,
    ROUTE_NOT_FOUND,
    TENANT_HEADER_FORBIDDEN,
    UNAUTHENTICATED,
    UNSUPPORTED_MEDIA_TYPE,
    VALIDATION_FAILED,
    Refusal,
)
from app.api.openapi_errors import ERROR_COMPONENTS, declared_refusals, render
from app.api.refusals import OIDC_UPSTREAM, TENANT_NOT_FOUND
from app.authz.require import PermissionFirstRoute

SECURITY_SCHEME = "bearer"
TENANT_HEADER = "X-DLW-Tenant"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

DESCRIPTION = """\
DLW: download tasks for model repositories, per tenant, admitted against quotas by the database.

**Authentication.** Every operation but health, login and the docs needs
`Authorization: Bearer <token>`, one of:

- a *system JWT*, minted by `GET /api/v1/auth/callback` after a login through the identity
  provider (or `dlw token issue` for operators); it carries the tenant and the role;
- an *access token* of the identity provider (client credentials) for a registered service
  account (`POST /api/v1/service-accounts`);
- the *service token* of the deployment (`DLW_SYSTEM_ADMIN_TOKEN`), acting as `system_admin`.

Missing, invalid or expired credentials answer 401 `UNAUTHENTICATED` (the reason is logged,
never told); a role the route does not allow answers 403 `RBAC_DENIED`. Roles are
`system_admin`, `tenant_admin`, `tenant_operator`, `tenant_viewer` and `executor`. A
`system_admin` may act inside another tenant by naming it (id or slug) in the `X-DLW-Tenant`
header; anyone else naming a tenant there gets 403 `TENANT_HEADER_FORBIDDEN`.

**Errors** all have one shape, `{"detail": {"code": "STABLE_CODE", "message": "...", ...}}`;
each operation lists its codes per status. Bodies are strict JSON (`application/json`).

**Retries.** `POST /api/v1/tasks` with an `Idempotency-Key` creates the task once; a retry with
the same key and body answers 200 with the first task, another body 409 `IDEMPOTENCY_CONFLICT`.
"""

TAGS: list[dict[str, str]] = [
    {"name": "tasks", "description": "Download tasks, the tenant's quota and its storage targets."},
    {
        "name": "hub token",
        "description": "The tenant's Hugging Face Hub token: set, clear, see whether one is set (never read back).",
    },
    {"name": "executor", "description": "For executors: claim files under a lease, heartbeat, report the outcome."},
    {"name": "administration", "description": "Tenants (system_admin), users, service accounts, the audit trail."},
    {"name": "auth", "description": "Login through the identity provider (or dev mode), and who am I."},
    {"name": "health", "description": "Liveness and readiness probes; public."},
]


def operation_id(route: APIRoute) -> str:
    """FastAPI's generate_unique_id_function: the route's function name in camelCase
    (create_task -> createTask); a route may name its operation itself (operation_id=)."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _has_permission_check(route: RouteContext) -> bool:
    return any(hasattr(d.call, "dlw_permission") for d in route.dependant.dependencies)


def _has_parameters(route: RouteContext) -> bool:
    d = route.dependant
    return bool(d.path_params or d.query_params or d.header_params or d.cookie_params or route.body_field)


def derived_refusals(route: RouteContext, method: str) -> list[Refusal]:
    """What a route can answer because of what it is, whatever it declares."""
    refusals = [INTERNAL_ERROR]
    strict = isinstance(route.original_route, PermissionFirstRoute)  # strict input (app/api/strict_input.py)
    if _has_permission_check(route):
        # credentials (app/identity/credentials.py), the route's permission, the tenant header
        refusals += [UNAUTHENTICATED, RBAC_DENIED, TENANT_HEADER_FORBIDDEN, TENANT_NOT_FOUND, OIDC_UPSTREAM]
        refusals.append(DB_UNAVAILABLE)  # the tenant header and service accounts are looked up
    if _has_parameters(route) or strict:  # strict: a NUL in the query is refused on any route
        refusals.append(VALIDATION_FAILED)
    if method in BODY_METHODS:  # the body size limit is middleware; strict JSON for these methods
        refusals.append(BODY_TOO_LARGE)
        if strict:
            refusals += [UNSUPPORTED_MEDIA_TYPE, INVALID_JSON, DUPLICATE_KEY]
    if "{" in (route.path_format or ""):  # a path parameter holding "/" may meet another route, or none
        refusals += [ROUTE_NOT_FOUND, METHOD_NOT_ALLOWED]
    return refusals


def _tenant_parameter() -> dict[str, Any]:
    return {
        "name": TENANT_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "system_admin only: act in this tenant (its id or slug); 404 TENANT_NOT_FOUND when there is"
        " none, 403 TENANT_HEADER_FORBIDDEN for any other role.",
    }


def _complete(operation: dict[str, Any], route: RouteContext, method: str) -> None:
    authenticated = _has_permission_check(route)
    responses = {k: v for k, v in operation["responses"].items() if int(k) < 400}
    responses.update(render([*declared_refusals(route.responses), *derived_refusals(route, method)]))
    operation["responses"] = responses
    operation["security"] = [{SECURITY_SCHEME: []}] if authenticated else []
    if authenticated:
        operation["parameters"] = [*operation.get("parameters", []), _tenant_parameter()]
    if not operation.get("description"):
        operation["description"] = operation.get("summary", route.name)


NO_NUL = "^[^\\x00]*$"
JSON_VALUE = "#/components/schemas/JsonValue"
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "title": "JsonValue",
    "description": "any JSON value whose strings (and keys) hold no NUL character",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": JSON_VALUE}},
        {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": {"$ref": JSON_VALUE}},
    ],
}


def _refuse_nul_in_requests(document: dict[str, Any]) -> None:
    """Strict input refuses a NUL in any string of a request (app/api/strict_input.py): say so in
    every request schema, so that what the document allows is what the API accepts. Strings with
    a pattern, format or enum of their own already exclude it."""
    schemas = document["components"]["schemas"]
    seen: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in seen and name in schemas:
                seen.add(name)
                visit(schemas[name])
            return
        if node.get("type") == "string" and not {"pattern", "format", "enum", "const"} & node.keys():
            node["pattern"] = NO_NUL
        if node.get("type") == "object" and node.get("additionalProperties") is True:
            node["additionalProperties"] = {"$ref": JSON_VALUE}
            node["propertyNames"] = {"pattern": NO_NUL}
        for key, value in node.items():
            if key not in ("examples", "example", "default"):
                visit(value)

    for item in document["paths"].values():
        for operation in item.values():
            visit([p.get("schema") for p in operation.get("parameters", [])])
            visit(operation.get("requestBody"))
    schemas["JsonValue"] = JSON_VALUE_SCHEMA


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _integer_bounds(node: Any) -> None:
    """An integer's bounds as integers. FastAPI's OpenAPI model types them as floats, so `le=1 << 62`
    was published as 4.611686018427388e+18, and a validator comparing in floating point (the
    fuzzer's, a client's) took 2**62 + 95 for valid: the API refuses it (422 VALIDATION_FAILED).
    Exact where the float was: every bound here is below 2**53 or a power of two (1 << 62); a new
    bound past 2**53 must be one too, or it is published rounded."""
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for key in BOUNDS:
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = int(value)
        for value in node.values():
            _integer_bounds(value)


def _drop_unreferenced(document: dict[str, Any]) -> None:
    """FastAPI's own validation schemas: the error responses no longer use them."""
    schemas = document["components"]["schemas"]
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(document["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def build(app: FastAPI) -> dict[str, Any]:
    """The API's OpenAPI document (deterministic: the same code gives the same document)."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=DESCRIPTION,
        routes=app.routes,
        tags=TAGS,
        servers=[{"url": "/", "description": "this deployment (the document is served by the API itself)"}],
        contact={"name": "the operators of this DLW deployment"},
    )
    # Included routers are kept nested (FastAPI >= 0.16x): walk their effective routes.
    for route in routing.iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            operation = document["paths"][route.path_format].get(method.lower())
            if operation is not None:
                _complete(operation, route, method)
    components = document.setdefault("components", {})
    components.setdefault("schemas", {}).update(ERROR_COMPONENTS)
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "a system JWT, an identity-provider access token of a service account, or the"
            " deployment's service token (see the description above)",
        }
    }
    _refuse_nul_in_requests(document)
    _integer_bounds(document)
    _drop_unreferenced(document)
    return document


def install(app: FastAPI) -> None:
    """app.openapi() answers the completed document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def enum_field(
    values: tuple[str, ...] | frozenset[str],
    *,
    nullable: bool = False,
    description: str | None = None,
    default: Any = ...,
) -> Any:
    """A response field documented as an enum of values from their one source (app/domain.py,
    the refusal registry), without a second copy as a Literal (default: required)."""
    listed: list[str | None] = [*sorted(values)] if isinstance(values, frozenset) else [*values]
    return Field(default, description=description, json_schema_extra={"enum": [*listed, *([None] if nullable else [])]})
