from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.harness import MigratedDb, PgServer, create_database, drop_database, start_server


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    with start_server(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(scope="module")
def db(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[MigratedDb]:
    """A freshly migrated database for this test module (cloned from the session template)."""
    label = re.sub(r"[^a-z0-9]+", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    database = create_database(pg_server, label)
    try:
        yield database
    finally:
        drop_database(database)
