"""Opaque keyset cursors: (timestamp, id) of the last row of a page, newest first."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from app.api.refusals import INVALID_CURSOR

MAX_LIMIT = 200


def encode(at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at), uuid.UUID(row_id)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise INVALID_CURSOR.error() from exc


def next_cursor(rows: list[Any], limit: int, time_column: str) -> str | None:
    """The cursor after a full page (rows ordered by time_column DESC, id DESC), else None."""
    if len(rows) < limit:
        return None
    return encode(rows[-1][time_column], rows[-1]["id"])
