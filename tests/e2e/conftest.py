"""Fixtures the end-to-end modules share."""

from __future__ import annotations

from collections.abc import Iterator

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
