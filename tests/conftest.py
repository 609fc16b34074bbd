from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import MigratedDb, PgServer, create_database, drop_database, start_server
from tests.support.formation import Formation, migrated, running_formation


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    # Not pytest's tmp_path: concurrent pytest runs prune each other's numbered tmp dirs.
    workdir = Path(tempfile.mkdtemp(prefix="dlw-test-pg-"))
    try:
        with start_server(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def db(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[MigratedDb]:
    """A freshly migrated database for this test module (cloned from the session template)."""
    label = re.sub(r"[^a-z0-9]+", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    database = create_database(pg_server, label)
    try:
        yield database
    finally:
        drop_database(database)


@pytest.fixture(scope="module")
def formation(request: pytest.FixtureRequest) -> Iterator[Formation]:
    """A real pg_auto_failover formation for this test module (tests/support/formation.py)."""
    with running_formation(request.module.__name__.rsplit(".", 1)[-1]) as started:
        yield started


@pytest.fixture(scope="module")
def formation_primary(formation: Formation) -> MigratedDb:
    """The formation's database, migrated, reached through the multi-host read-write URL: on
    whichever node is primary, before and after a failover."""
    return migrated(formation)
