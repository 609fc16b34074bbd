"""Every error answer the API test suite provokes has the one shape (docs/errors.md):
{"detail": {"code": "<STABLE_CODE>", "message": "<human text>", ...}}."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient


def shape_problem(response: httpx.Response) -> str | None:
    """Why an error answer is not in the one shape, or None when it is (or is no error)."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or list(body) != ["detail"] or not isinstance(body["detail"], dict):
        return "not {'detail': {...}}"
    detail: dict[str, Any] = body["detail"]
    if not isinstance(detail.get("code"), str) or not detail["code"].isupper():
        return "no stable code"
    if not isinstance(detail.get("message"), str) or not detail["message"]:
        return "no message"
    if "errors" in detail and not all(set(e) == {"loc", "msg", "type"} for e in detail["errors"]):
        return "validation errors not as {loc, msg, type}"
    return None


@pytest.fixture(autouse=True)
def every_error_has_the_one_shape(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    problems: list[str] = []
    original = TestClient.request

    def checked(self: TestClient, method: str, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        response = original(self, method, url, *args, **kwargs)
        problem = shape_problem(response)
        if problem is not None:
            problems.append(f"{method} {url} -> {response.status_code}: {problem}: {response.text[:200]}")
        return response

    monkeypatch.setattr(TestClient, "request", checked)
    yield
    assert not problems, problems
