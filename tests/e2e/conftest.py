"""Fixtures the end-to-end modules share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import server
from tests.support.database import MigratedDb
from tests.support.hub import HubEmulator


@pytest.fixture(scope="module")
def api(db: MigratedDb, hub: HubEmulator) -> Iterator[str]:
    """A real `dlw serve` that resolves tasks at the module's hub emulator (its `hub` fixture
    says which repositories it holds); a module with an `api` fixture of its own overrides this."""
    with server.running_server(db, DLW_HF_ENDPOINT=hub.url) as url:
        yield url


@pytest.fixture
def work(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory for the test's storage and executors, named after its module
    (test_e2e_dedup: dlw-e2e-dedup-...), removed afterwards."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_e2e_").replace("_", "-")
    path = Path(tempfile.mkdtemp(prefix=f"dlw-e2e-{name}-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
