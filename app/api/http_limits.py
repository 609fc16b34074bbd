"""The HTTP server's own limits: slow and oversized clients are refused before the app runs.

uvicorn brings timeout_keep_alive (idle between requests) and limit_concurrency, but with
httptools nothing bounds the time or the bytes a client may take to send its request headers:
a connection that never finishes them is held forever, and httptools buffers a header of any
size. (h11's h11_max_incomplete_event_size bounds the bytes, not the time.) This protocol adds
both to uvicorn's httptools protocol; `dlw serve` and `dlw dev` run it with the same settings
(`uvicorn_options`). Its refusals are in the one error shape.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import HEADER_TIMEOUT, HEADERS_TOO_LARGE, MALFORMED_REQUEST, Refusal
from app.config import Settings


@dataclass(frozen=True)
class HeaderLimits:
    timeout_seconds: float  # from the first byte of a request (or the connection) to its last header
    max_bytes: int  # request line and headers together
    max_count: int  # header lines


class _Refused(Exception):
    pass


def refusal_bytes(refusal: Refusal) -> bytes:
    """A complete HTTP/1.1 answer in the one error shape, after which the server closes."""
    body = json.dumps({"detail": {"code": refusal.code, "message": refusal.description}}).encode()
    head = (
        f"HTTP/1.1 {refusal.status} {refusal.code.replace('_', ' ').lower()}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(limits: HeaderLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these header limits (uvicorn takes a protocol class)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_headers = True  # a new connection owes its first request's headers
            self._header_bytes = 0  # of the headers httptools completed
            self._header_count = 0
            self._raw_bytes = 0  # received since the request began, headers still unfinished
            self._refusal: Refusal | None = None
            self._header_timer: asyncio.TimerHandle | None = None

        # -- the header phase: from a request's first byte (or the connection) to its last header
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes, self._header_count, self._raw_bytes = True, 0, 0, 0
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url), 0)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4, 1)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # httptools holds an unfinished header in memory: bound what a request may send
            # before its headers end, not only the headers it completed.
            if self._in_headers and self._refusal is None and not self.transport.is_closing():
                self._raw_bytes += len(data)
                if self._raw_bytes > limits.max_bytes:
                    self._refuse(HEADERS_TOO_LARGE)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        # -- refusals
        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to anything the parser refused; a limit of ours raised in a callback.
            self._refuse(self._refusal or MALFORMED_REQUEST)

        def _count(self, size: int, count: int) -> None:
            self._header_bytes += size
            self._header_count += count
            if self._header_bytes > limits.max_bytes or self._header_count > limits.max_count:
                self._refusal = HEADERS_TOO_LARGE
                raise _Refused  # httptools stops parsing; uvicorn calls send_400_response

        def _refuse(self, refusal: Refusal) -> None:
            self._refusal = refusal
            self._disarm()
            if not self.transport.is_closing():
                self.logger.info("refused a request: %s %s", refusal.status, refusal.code)
                self.transport.write(refusal_bytes(refusal))
                self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.timeout_seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._in_headers:
                self._refuse(HEADER_TIMEOUT)

    return GuardedHttpToolsProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments `dlw serve` (and so `dlw dev`) gives uvicorn.run."""
    limits = HeaderLimits(
        timeout_seconds=settings.http_header_timeout_seconds,
        max_bytes=settings.http_max_header_bytes,
        max_count=settings.http_max_headers,
    )
    return {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": settings.http_keep_alive_seconds,
        "limit_concurrency": settings.http_limit_concurrency,
    }
