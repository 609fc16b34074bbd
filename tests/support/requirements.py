"""Tests that need something outside Python (Node.js, pg_cron) skip loudly on a developer's
machine that lacks it, and fail under CI, where .ci/run installs everything."""

from __future__ import annotations

import os

import pytest


def require(missing: str | None, what: str) -> None:
    """Skip (locally) or fail (CI=true) when `missing` names what is absent."""
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} must run in CI: {missing}")
    pytest.skip(f"{what} NOT RUN: {missing}; under CI=true this fails instead of skipping")
