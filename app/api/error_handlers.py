"""Error answers without a trace: database failures through the SQLSTATE table, the rest 500."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import INTERNAL_ERROR, METHOD_NOT_ALLOWED, ROUTE_NOT_FOUND, Refusal
from app.api.sqlstates import UNAVAILABLE_ERRORS, answer_for

log = logging.getLogger("dlw")


ROUTING_REFUSALS = {r.status: r for r in (ROUTE_NOT_FOUND, METHOD_NOT_ALLOWED)}


def _answer(refusal: Refusal, headers: Mapping[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    return JSONResponse(status_code=refusal.status, content={"detail": {"code": refusal.code}}, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Our own refusals (a detail with a code) as they are; the router's 404 and 405, which carry
    Starlette's plain text, in the same shape: {"detail": {"code": ...}}."""
    assert isinstance(exc, StarletteHTTPException)
    refusal = None if isinstance(exc.detail, dict) else ROUTING_REFUSALS.get(exc.status_code)
    if refusal is None:
        return await http_exception_handler(request, exc)
    return _answer(refusal, exc.headers)  # keeps Allow on a 405


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database failure no route answered: the SQLSTATE table decides."""
    refusal = answer_for(exc)
    if refusal is None:
        log.error("unhandled database error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(INTERNAL_ERROR)
    # A 4xx here is the database refusing what the route allowed (defense in depth at work).
    log.warning(
        "database answered %s %s on %s %s: %r", refusal.status, refusal.code, request.method, request.url.path, exc
    )
    return _answer(refusal)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace or a library message to the client; the log keeps the details.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _answer(INTERNAL_ERROR)


def install(app: FastAPI) -> None:
    # Handlers for specific classes answer inside the routing layer (nothing is re-raised);
    # the catch-all Exception handler runs in Starlette's outermost middleware.
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(asyncpg.PostgresError, database_error)
    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, database_error)
    app.add_exception_handler(Exception, unexpected_error)
