"""Opaque keyset cursors: (timestamp, id) of the last row of a page, newest first; and the
read of one such page."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import Request

from app.api.refusals import INVALID_CURSOR
from app.api.transaction import fetch_rows
from app.identity.principal import Principal

MAX_LIMIT = 200
MAX_CURSOR_LENGTH = 200  # an issued cursor is about 100 characters


def encode(at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    # Anything but the exact form encode() writes is refused: other types, deep nesting (a
    # RecursionError), naive or out-of-range timestamps (an OverflowError on the way to UTC).
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("cursor too long")
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(v, str) for v in decoded)):
            raise ValueError("not a cursor")
        at = datetime.fromisoformat(decoded[0])
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        at.astimezone(UTC)
        return at, uuid.UUID(decoded[1])
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, OverflowError) as exc:
        raise INVALID_CURSOR.error() from exc


def next_cursor(rows: list[Any], limit: int, time_column: str) -> str | None:
    """The cursor after a full page (rows ordered by time_column DESC, id DESC), else None."""
    if len(rows) < limit:
        return None
    return encode(rows[-1][time_column], rows[-1]["id"])


async def keyset_page(
    request: Request,
    principal: Principal,
    query: str,
    *filters: Any,
    cursor: str | None,
    limit: int,
    time_column: str,
) -> tuple[list[asyncpg.Record], str | None]:
    """One page of a query taking the cursor's (at, id) as $1, $2 (both NULL on the first page),
    then the filters, then the limit; its rows and the cursor after it.

    A cursor this API did not issue is refused before any database work."""
    after = decode(cursor)
    rows = await fetch_rows(request, principal, query, *(after or (None, None)), *filters, limit)
    return rows, next_cursor(rows, limit, time_column)
