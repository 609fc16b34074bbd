"""The error answers of each operation, declared by its route and derived from the route itself.

A route declares only what is its own: the SQL calls it makes (registry keys of
app/api/refusals.py) and refusals it answers itself, through `responses=error_responses(...)`.
Everything else a route can answer follows from what the route is, and is derived when the
document is built (app/api/openapi_document.py, `derived_refusals`): 401/403 and the
X-DLW-Tenant answers for a route with a permission check, 413/415/422 for a method that
takes a body, 422 for parameters, 404/405 of the router for a templated path, 500 always.
So a route added later gets a truthful document from its one declaration.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from app.api.errors import COMMIT_UNCERTAIN, DB_FORBIDDEN, DB_UNAVAILABLE, Refusal
from app.api.refusals import REGISTRY

# The declared refusals ride in each response entry under this key; the document builder reads
# them back (as [status, code, description, retry_after] lists) and removes the key.
DECLARED = "x-dlw-refusals"

ERROR_REF = "#/components/schemas/Error"

ERROR_COMPONENTS: dict[str, Any] = {
    "Error": {
        "title": "Error",
        "description": "The one error shape of every answer of 400 and above (docs/errors.md).",
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"$ref": "#/components/schemas/ErrorDetail"}},
        "additionalProperties": False,
    },
    "ErrorDetail": {
        "title": "ErrorDetail",
        "description": "A stable `code` (what a client branches on), a human `message`, and for some codes"
        " more fields (`errors` of a validation failure, `metric` of QUOTA_EXCEEDED, `task_status`).",
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$", "description": "stable error code"},
            "message": {"type": "string", "minLength": 1, "description": "for people; may change"},
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}},
        },
        "additionalProperties": True,
    },
    "FieldError": {
        "title": "FieldError",
        "description": "One field of a request that did not validate (422 VALIDATION_FAILED).",
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"},
            "type": {"type": "string"},
        },
    },
}


def error_responses(*answers: str | Refusal, authenticated: bool = True, database: bool = True) -> dict[int | str, Any]:
    """The `responses=` of a route: its own refusals, by status.

    answers are registry keys (the SQL calls the route makes) or refusals it raises itself;
    database adds 403 DB_FORBIDDEN and 503 DB_UNAVAILABLE / COMMIT_UNCERTAIN (the route runs SQL). authenticated
    is kept for the callers' clarity only: whether a route authenticates is read from the
    route (its require_perm dependency), never from this flag."""
    del authenticated  # derived from the route (app/api/openapi_document.py)
    refusals: list[Refusal] = []
    for answer in answers:
        refusals.extend(REGISTRY[answer].all() if isinstance(answer, str) else [answer])
    if database:
        refusals += [DB_FORBIDDEN, DB_UNAVAILABLE, COMMIT_UNCERTAIN]
    by_status: dict[int, list[Refusal]] = defaultdict(list)
    for refusal in refusals:
        by_status[refusal.status].append(refusal)
    return {
        status: {
            "description": "error",
            DECLARED: [[r.status, r.code, r.description, r.retry_after] for r in listed],
        }
        for status, listed in sorted(by_status.items())
    }


def declared_refusals(responses: dict[int | str, Any]) -> list[Refusal]:
    """The refusals error_responses put into a route's responses."""
    found: list[Refusal] = []
    for entry in responses.values():
        for status, code, description, retry_after in entry.get(DECLARED, []) if isinstance(entry, dict) else []:
            found.append(Refusal(status, code, description, retry_after=retry_after))
    return found


def render(refusals: Iterable[Refusal]) -> dict[str, Any]:
    """The error responses of an operation: per status, the codes (an enum in the schema, and
    each with its meaning in the description), the one error shape, Retry-After and
    WWW-Authenticate where they are sent."""
    by_status: dict[int, dict[str, Refusal]] = defaultdict(dict)
    for refusal in refusals:
        by_status[refusal.status].setdefault(refusal.code, refusal)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        codes = by_status[status]
        schema = {
            "allOf": [{"$ref": ERROR_REF}],
            "properties": {"detail": {"properties": {"code": {"enum": sorted(codes)}}}},
        }
        lines = "\n".join(f"- `{code}`: {codes[code].description}" for code in sorted(codes))
        response: dict[str, Any] = {
            "description": f"{_TITLES.get(status, 'Error')}:\n\n{lines}",
            "content": {"application/json": {"schema": schema}},
        }
        headers: dict[str, Any] = {}
        if any(r.retry_after is not None for r in codes.values()):
            headers["Retry-After"] = {
                "description": "seconds to wait before retrying (sent with the codes that say retry)",
                "schema": {"type": "integer", "minimum": 0},
            }
        if status == 401:
            headers["WWW-Authenticate"] = {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}
        if headers:
            response["headers"] = headers
        responses[str(status)] = response
    return responses


_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    429: "Refused by a quota",
    500: "Internal error",
    503: "Unavailable: retry",
}
