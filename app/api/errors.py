"""Errors the API answers with: a status and a stable code, never a library message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail={"code": code, **extra}, headers=headers)


def refuse(outcome: str, answers: Mapping[str, tuple[int, str]]) -> None:
    """Raise the (status, code) answer for a refusal that a SQL function returned as its
    outcome; any outcome not in `answers` passes."""
    answer = answers.get(outcome)
    if answer is not None:
        raise ApiError(*answer)


def unauthenticated() -> ApiError:
    # One terse answer for every authentication failure: the reason is logged, not revealed.
    return ApiError(401, "UNAUTHENTICATED", headers={"WWW-Authenticate": "Bearer"})
