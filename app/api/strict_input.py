"""Strict request input: a body is strict JSON (or refused) before FastAPI or pydantic read it.

Answered after the permission check and before the route reads anything, in the one error
shape {"detail": {"code", "message"}}:
- a body that is not application/json: 415 UNSUPPORTED_MEDIA_TYPE (the body is never echoed);
- NaN, Infinity, numbers beyond a double (1e400), lone surrogates, invalid UTF-8 or nesting
  deeper than MAX_DEPTH: 422 INVALID_JSON;
- an object naming a key twice: 422 DUPLICATE_KEY (json's default would keep the last one);
- a NUL character in any string of the body, in the path or in a query parameter:
  422 VALIDATION_FAILED (PostgreSQL text and jsonb cannot hold it).
A body that passes is handed to FastAPI already parsed (Starlette's cached request.json()).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.requests import Request
from starlette.types import Scope

from app.api.errors import DUPLICATE_KEY, INVALID_JSON, UNSUPPORTED_MEDIA_TYPE, VALIDATION_FAILED, ApiError, Refusal

MAX_DEPTH = 64
JSON_TYPES = ("application/json",)


class Refused(Exception):
    def __init__(self, refusal: Refusal, **extra: Any) -> None:
        super().__init__(refusal.code)
        self.refusal = refusal
        self.extra = extra


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Refused(DUPLICATE_KEY)
        result[key] = value
    return result


def _constant(name: str) -> float:
    raise Refused(INVALID_JSON)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise Refused(INVALID_JSON)
    return value


def _check_string(value: str, loc: list[str | int]) -> None:
    if "\x00" in value:
        raise Refused(VALIDATION_FAILED, errors=[_nul_error(loc)])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(INVALID_JSON) from None


def _nul_error(loc: list[str | int]) -> dict[str, Any]:
    return {"loc": loc, "msg": "must not contain a NUL character", "type": "string_nul"}


def _check_tree(document: Any) -> None:
    """Every string (keys included) encodable and NUL-free; nesting at most MAX_DEPTH."""
    stack: list[tuple[Any, list[str | int]]] = [(document, ["body"])]
    while stack:
        value, loc = stack.pop()
        if len(loc) > MAX_DEPTH + 1:
            raise Refused(INVALID_JSON)
        if isinstance(value, str):
            _check_string(value, loc)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, [*loc, key])
                stack.append((item, [*loc, key]))
        elif isinstance(value, list):
            stack.extend((item, [*loc, index]) for index, item in enumerate(value))


def strict_loads(raw: bytes) -> Any:
    """The body as strict JSON, or Refused."""
    try:
        document = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
        )
    except Refused:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise Refused(INVALID_JSON) from exc
    _check_tree(document)
    return document


def check_query(scope: Scope) -> None:
    if "\x00" in unquote(scope.get("path", "")):
        raise Refused(VALIDATION_FAILED, errors=[_nul_error(["path"])])
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            raise Refused(VALIDATION_FAILED, errors=[_nul_error(["query", name.replace("\x00", "")])])


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


async def check_request(request: Request) -> None:
    """Refuse (ApiError) a NUL in the path or query, a non-JSON body, or a body that is not
    strict JSON. Runs after the permission check (app/authz/require.py), before FastAPI reads
    the body; FastAPI then uses the parsed document."""
    try:
        check_query(request.scope)
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        raw = await request.body()
        if raw:
            if not _is_json(dict(request.scope["headers"]).get(b"content-type")):
                raise Refused(UNSUPPORTED_MEDIA_TYPE)
            # Starlette caches the parsed body here and FastAPI reads it through request.json():
            # the strict parse is the only one on the request path.
            request._json = strict_loads(raw)
    except Refused as refused:
        raise ApiError(refused.refusal.status, refused.refusal.code, **refused.extra) from None
