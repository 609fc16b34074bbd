"""Errors the API answers with: a status and a stable code, never a library message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException


class ApiError(HTTPException):
    """An error answer: {"detail": {"code": ..., "message": ..., **extra}}; without a message
    the code's registered description is answered (app/api/error_handlers.py fills it in)."""

    message: str | None = None  # a Refusal's own description (a code may have several)

    def __init__(self, status: int, code: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail={"code": code, **extra}, headers=headers)


@dataclass(frozen=True)
class Refusal:
    """One documented error answer: status, stable code, and what it means.

    fields names columns of the SQL result row copied into the detail (e.g. the quota metric);
    extra is fixed detail; retry_after adds a Retry-After header."""

    status: int
    code: str
    description: str
    fields: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    retry_after: int | None = None

    def error(self, row: Mapping[str, Any] | None = None) -> ApiError:
        values = {name: row[name] for name in self.fields} if row is not None else {}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        error = ApiError(self.status, self.code, headers=headers, **self.extra, **values)
        error.message = self.description
        return error


# Answers any route may give, whatever SQL it calls.
UNAUTHENTICATED = Refusal(401, "UNAUTHENTICATED", "missing, invalid or expired credentials")
RBAC_DENIED = Refusal(403, "RBAC_DENIED", "the caller's roles do not allow this route")
DB_FORBIDDEN = Refusal(403, "DB_FORBIDDEN", "the database refused the statement (row-level security, privileges)")
DB_UNAVAILABLE = Refusal(503, "DB_UNAVAILABLE", "the database cannot serve right now", retry_after=2)
COMMIT_UNCERTAIN = Refusal(
    503,
    "COMMIT_UNCERTAIN",
    "the database connection failed during COMMIT: the change may have been made; retry with the same Idempotency-Key",
    retry_after=1,
)
INTERNAL_ERROR = Refusal(500, "INTERNAL_ERROR", "an unexpected failure (logged, never described)")
# Answers of the router itself. Paths are exact: a trailing slash is not redirected (a redirect
# would be built from the request's Host header), it is simply no route.
ROUTE_NOT_FOUND = Refusal(404, "ROUTE_NOT_FOUND", "no route has this path (paths never end with a slash)")
METHOD_NOT_ALLOWED = Refusal(405, "METHOD_NOT_ALLOWED", "the route does not take this method (see the Allow header)")


# Answers of the request reader (app/api/strict_input.py) and of request validation.
INVALID_JSON = Refusal(
    422, "INVALID_JSON", "the body is not strict JSON (NaN, Infinity, overflowing numbers, lone surrogates)"
)
DUPLICATE_KEY = Refusal(422, "DUPLICATE_KEY", "a JSON object of the body names the same key twice")
VALIDATION_FAILED = Refusal(422, "VALIDATION_FAILED", "the request does not validate (see errors)")
UNSUPPORTED_MEDIA_TYPE = Refusal(415, "UNSUPPORTED_MEDIA_TYPE", "a request body must be application/json")
BODY_TOO_LARGE = Refusal(413, "BODY_TOO_LARGE", "the request body is larger than the API accepts")
# Answers of the HTTP server itself, before the app runs (app/api/http_limits.py).
MALFORMED_REQUEST = Refusal(400, "MALFORMED_REQUEST", "the request is not valid HTTP/1.1")
HEADER_TIMEOUT = Refusal(408, "HEADER_TIMEOUT", "the request headers did not arrive in time")
HEADERS_TOO_LARGE = Refusal(431, "HEADERS_TOO_LARGE", "the request headers are larger or more than the API accepts")
TENANT_HEADER_FORBIDDEN = Refusal(403, "TENANT_HEADER_FORBIDDEN", "only a system admin may name another tenant")


def unauthenticated() -> ApiError:
    # One terse answer for every authentication failure: the reason is logged, not revealed.
    return ApiError(401, "UNAUTHENTICATED", headers={"WWW-Authenticate": "Bearer"}, message=UNAUTHENTICATED.description)
