"""Every request's identity and its one access-log line, and the request metrics.

The request id is the caller's `X-Request-ID` when it is a short token of safe characters, else a
new one; either way it is echoed in the response's `X-Request-ID` and carried by every log line
written while the request runs (app/logs.py). When the response is done, one `dlw.access` line
records method, route template, status, duration and the tenant and principal ids the credential
resolved to (app/identity/credentials.py keeps the principal in request.state); the same
observation feeds the request counters and latency histograms (app/api/metrics.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.metrics import UNMATCHED, metrics_of
from app.logs import REQUEST_FIELDS

access_log = logging.getLogger("dlw.access")
HEADER = "x-request-id"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER.encode():
            text = str(value.decode("latin-1"))
            if _SAFE_ID.fullmatch(text):
                return text
            break  # an unsafe id (newlines, JSON, megabytes) is replaced, never logged
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/api/v1/tasks/{task_id}`): bounded, unlike raw paths."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else UNMATCHED


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        fields: dict[str, Any] = {"request_id": request_id}
        token = REQUEST_FIELDS.set(fields)
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route, method = route_template(scope), str(scope.get("method", ""))
            principal = (scope.get("state") or {}).get("principal")
            fields.update(
                method=method,
                route=route,
                status=status,
                duration_ms=round(seconds * 1000, 2),
                tenant_id=getattr(principal, "tenant_id", None),
                principal_id=getattr(principal, "user_id", None),
            )
            access_log.info("%s %s %d %.1fms id=%s", method, route, status, seconds * 1000, request_id)
            metrics = metrics_of(scope["app"]) if "app" in scope else None
            if metrics is not None:
                metrics.observe_request(route, method, status, seconds)
            REQUEST_FIELDS.reset(token)
