"""The reference executor reads a file endpoint's Retry-After (app/executor/transfer.py) as RFC
9110 allows it, delay-seconds or an HTTP-date, and sends it with a retryable failure."""

from __future__ import annotations

import email.utils
import time

import pytest

from app.executor.http_ranges import _retry_after


@pytest.mark.parametrize(("value", "seconds"), [("7", 7.0), (" 120 ", 120.0), ("0", 0.0)])
def test_delay_seconds(value: str, seconds: float):
    assert _retry_after(value) == seconds


def test_an_http_date_is_the_seconds_until_it():
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    waited = _retry_after(later)
    assert waited is not None and 55 <= waited <= 60
    earlier = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert _retry_after(earlier) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2026 00:00:00"])
def test_anything_else_is_no_retry_after(value: str | None):
    assert _retry_after(value) is None
