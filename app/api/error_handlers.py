"""Error answers without a trace: database failures through the SQLSTATE table, the rest 500."""

from __future__ import annotations

import logging

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.api.errors import INTERNAL_ERROR, Refusal
from app.api.sqlstates import UNAVAILABLE_ERRORS, answer_for

log = logging.getLogger("dlw")


def _answer(refusal: Refusal) -> JSONResponse:
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
    return JSONResponse(status_code=refusal.status, content={"detail": {"code": refusal.code}}, headers=headers)


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
    app.add_exception_handler(asyncpg.PostgresError, database_error)
    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, database_error)
    app.add_exception_handler(Exception, unexpected_error)
