"""The error responses of the OpenAPI document, built from the refusal registry.

A route passes the SQL calls it makes (registry keys) and any refusals it answers itself;
the generic answers (401/403 for authenticated routes, 503 DB_UNAVAILABLE, 500) are added, so
the document lists every stable code the route can answer with.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from app.api.errors import (
    COMMIT_UNCERTAIN,
    DB_FORBIDDEN,
    DB_UNAVAILABLE,
    INTERNAL_ERROR,
    RBAC_DENIED,
    UNAUTHENTICATED,
    Refusal,
)
from app.api.refusals import REGISTRY

# FastAPI's own request validation answers 422 with a list; kept in the schema next to our codes.
_VALIDATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "object",
            "required": ["code", "message", "errors"],
            "properties": {
                "code": {"type": "string", "enum": ["VALIDATION_FAILED"]},
                "message": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string", "enum": codes}, "message": {"type": "string"}},
            }
        },
    }


def error_responses(*answers: str | Refusal, authenticated: bool = True, database: bool = True) -> dict[int | str, Any]:
    """The `responses=` of a route: each status with its description and code list.

    answers are registry keys (the SQL calls the route makes) or refusals; authenticated adds
    401 UNAUTHENTICATED and 403 RBAC_DENIED; database adds 403 DB_FORBIDDEN and 503 DB_UNAVAILABLE
    / COMMIT_UNCERTAIN."""
    refusals: list[Refusal] = []
    for answer in answers:
        refusals.extend(REGISTRY[answer].all() if isinstance(answer, str) else [answer])
    if authenticated:
        refusals += [UNAUTHENTICATED, RBAC_DENIED]
    if database:
        refusals += [DB_FORBIDDEN, DB_UNAVAILABLE, COMMIT_UNCERTAIN]
    refusals.append(INTERNAL_ERROR)
    by_status: dict[int, dict[str, str]] = defaultdict(dict)
    for refusal in refusals:
        by_status[refusal.status].setdefault(refusal.code, refusal.description)
    responses: dict[int | str, Any] = {}
    for status in sorted(by_status):
        codes = by_status[status]
        schema = _error_schema(sorted(codes))
        description = "; ".join(f"`{code}`: {text}" for code, text in sorted(codes.items()))
        if status == 422:  # request validation too (the list form of detail)
            schema = {"anyOf": [schema, _VALIDATION_SCHEMA]}
            description += "; or `VALIDATION_FAILED`: request validation failed (detail.errors lists the fields)"
        responses[status] = {"description": description, "content": {"application/json": {"schema": schema}}}
    return responses
