"""Error answers without a trace: database failures through the SQLSTATE table, the rest 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import errors, refusals, sqlstates
from app.api.errors import INTERNAL_ERROR, METHOD_NOT_ALLOWED, ROUTE_NOT_FOUND, VALIDATION_FAILED, Refusal
from app.api.sqlstates import UNAVAILABLE_ERRORS, CommitUncertain, answer_for

log = logging.getLogger("dlw")


CANDIDATE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ROUTING_REFUSALS = {r.status: r for r in (ROUTE_NOT_FOUND, METHOD_NOT_ALLOWED)}


def _messages() -> dict[str, str]:
    """Every registered code's human message (its description)."""
    found: list[Refusal] = []
    for module in (errors, sqlstates, refusals):
        found += [value for value in vars(module).values() if isinstance(value, Refusal)]
    for answers in refusals.REGISTRY.values():
        found += answers.all()
    return {refusal.code: refusal.description for refusal in found}


MESSAGES = _messages()


class StrictJSONResponse(JSONResponse):
    """ASCII-escaped and without NaN: an error answer always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(
    status: int, code: str, headers: Mapping[str, str] | None = None, message: str | None = None, **extra: Any
) -> JSONResponse:
    """The one error shape: {"detail": {"code": ..., "message": ..., **extra}}."""
    text = message or MESSAGES.get(code) or _phrase(status)
    return StrictJSONResponse(
        status_code=status, content={"detail": {"code": code, "message": text, **extra}}, headers=dict(headers or {})
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "the request was refused"


def _answer(refusal: Refusal, headers: Mapping[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    return error_response(refusal.status, refusal.code, headers, refusal.description)


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path takes (Starlette's 405 names only the first route's).

    Asked of the router method by method: included routers are matched lazily, not listed."""
    methods = set()
    for method in CANDIDATE_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.add(method)
    return ", ".join(sorted(methods))


async def http_error(request: Request, exc: Exception) -> Response:
    """Every HTTP error in one shape, {"detail": {"code": ..., "message": ...}}: our own refusals
    (a detail with a code) get their registered message if they carry none; the router's 404 and
    405, which carry Starlette's plain text, get their codes; a 405 lists every allowed method."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if isinstance(exc.detail, dict) and isinstance(exc.detail.get("code"), str):
        detail = dict(exc.detail)
        message = detail.pop("message", None) or getattr(exc, "message", None)
        return error_response(exc.status_code, detail.pop("code"), headers, message, **detail)
    refusal = ROUTING_REFUSALS.get(exc.status_code)
    if refusal is None:
        code = _phrase(exc.status_code).upper().replace(" ", "_").replace("-", "_").replace("'", "")
        return error_response(exc.status_code, code, headers)
    if refusal is METHOD_NOT_ALLOWED:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return _answer(refusal, headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's validation list inside the one shape; never the input (it may not encode)."""
    assert isinstance(exc, RequestValidationError)
    listed = [
        {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
        for error in exc.errors()
    ]
    return error_response(422, VALIDATION_FAILED.code, None, VALIDATION_FAILED.description, errors=listed)


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
    """Whatever no handler answered: a database fault the table knows (a connection fault raised
    outside a route's own handlers) is answered so; anything else is 500, and only its log line
    carries the trace. Never a stack trace or a library message to the client."""
    if answer_for(exc) is not None:
        return await database_error(request, exc)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(INTERNAL_ERROR)


class AnswerErrors:
    """The catch-all, as the outermost middleware of ours: it answers and does not re-raise.

    Starlette's own catch-all (ServerErrorMiddleware) re-raises after answering, so uvicorn logs
    "Exception in ASGI application" with a second traceback and closes the keep-alive
    connection. Here a handled error is one log line and the connection stays usable. An error
    after the response started still propagates: closing the connection is then the only way to
    tell the client the answer is broken."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await unexpected_error(Request(scope), exc)
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    # Handlers for specific classes answer inside the routing layer (nothing is re-raised);
    # everything else reaches AnswerErrors, which must be the last middleware added (outermost).
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(asyncpg.PostgresError, database_error)
    for error in (*UNAVAILABLE_ERRORS, CommitUncertain):
        app.add_exception_handler(error, database_error)
    app.add_middleware(AnswerErrors)
