"""Reporting logins on a hot standby (docs/reporting.md, docs/high-availability.md): the streaming replica
of a real pg_auto_failover formation (tests/support/formation.py), reached with
target_session_attrs=standby. The same row-level security as on the primary (the checks of
tests/psql/test_rls_reporting.py and test_reporting_psql.py, run on the standby), the reporting
views read-only, the login's limits in force, and the replication lag visible to the analyst
through reporting.replica_status().

Needs postgresql-15, postgresql-15-auto-failover and pg-auto-failover-cli (installed by
.ci/run). Without them the tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors

from tests.psql.test_rls_reporting import tenant_ids_seen
from tests.support.catalog import REPORTING_VIEWS, readable_columns, readable_tables
from tests.support.database import MigratedDb, PgServer
from tests.support.formation import Formation
from tests.support.tenants import SeededTenant, as_tenant, seeded_tenants

STATUS = "SELECT is_standby, last_replayed_at, replay_caught_up, lag FROM reporting.replica_status()"


@pytest.fixture(scope="module")
def primary(formation_primary: MigratedDb) -> MigratedDb:
    return formation_primary


@pytest.fixture(scope="module")
def standby(formation: Formation, primary: MigratedDb) -> MigratedDb:
    """The same database, every connection sent to the standby (as an analyst's would be)."""
    url = formation.url(formation.user.pw_name, attrs="standby")
    return MigratedDb(PgServer(url, "pg_auto_failover standby", primary.server.app_password), primary.name)


@pytest.fixture(scope="module")
def tenants(primary: MigratedDb, standby: MigratedDb) -> Iterator[list[SeededTenant]]:
    with seeded_tenants(primary, "standby-a", "standby-b") as seeded:
        caught_up(primary, standby)
        yield seeded


def caught_up(primary: MigratedDb, standby: MigratedDb) -> None:
    """Wait until the standby has replayed everything the primary wrote so far."""
    with primary.owner() as conn:
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + 30
    with standby.owner() as conn:
        while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the standby did not replay the primary's writes"
            time.sleep(0.1)


def login(db: MigratedDb, t: SeededTenant) -> psycopg.Connection:
    return psycopg.connect(db.url(t.login, t.password), autocommit=True)


def test_reporting_on_the_standby_sees_only_its_tenant_whatever_it_sets(primary, standby, tenants):
    a, b = tenants
    relations = readable_tables(primary)
    assert {f"reporting.{v}" for v in REPORTING_VIEWS} <= set(relations)
    with login(standby, a) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        spoofs = [f"SELECT set_config('dlw.tenant_id', '{b.tenant_id}', false)", f"SET dlw.tenant_id = '{b.tenant_id}'"]
        for spoof in ["", *spoofs]:
            if spoof:
                conn.execute(spoof)
            for relation in relations:
                columns = readable_columns(primary, relation)
                assert tenant_ids_seen(conn, relation, columns) <= {a.tenant_id}, (spoof, relation)
            for view in REPORTING_VIEWS:
                assert conn.execute(f"SELECT count(*) FROM reporting.{view}").fetchone()[0] > 0, view
        assert conn.execute("SELECT count(*), count(DISTINCT tenant_id) FROM reporting.tasks").fetchone() == (1, 1)
        with pytest.raises(errors.InsufficientPrivilege):
            as_tenant(conn, b.tenant_id, "system_admin", user="x")


def test_reporting_on_the_standby_is_read_only_and_keeps_the_logins_limits(primary, standby, tenants):
    a, _ = tenants
    with login(standby, a) as conn:
        for statement in (
            "DELETE FROM reporting.audit_log",
            "UPDATE dlw.tasks SET priority = 0",
            "CREATE TEMP TABLE scratch (x int)",
        ):
            with pytest.raises((errors.ReadOnlySqlTransaction, errors.InsufficientPrivilege)):
                conn.execute(statement)
        # The role's settings replicate with the catalog: the same timeouts hold on the standby.
        with login(primary, a) as on_primary:
            expected = on_primary.execute("SHOW statement_timeout").fetchone()
        assert conn.execute("SHOW statement_timeout").fetchone() == expected
        assert expected != ("0",)


def test_the_lag_is_visible_to_the_analyst(primary, standby, tenants):
    a, _ = tenants
    with login(primary, a) as conn:
        is_standby, replayed, caught, lag = conn.execute(STATUS).fetchone()
        assert (is_standby, replayed, caught, lag) == (False, None, True, timedelta(0))
    with login(standby, a) as conn:
        is_standby, replayed, caught, lag = conn.execute(STATUS).fetchone()
        assert is_standby is True and replayed is not None and caught is True and lag == timedelta(0)
        before = conn.execute("SELECT count(*) FROM reporting.audit_log").fetchone()[0]
    with standby.owner() as dba:
        dba.execute("SELECT pg_wal_replay_pause()")  # the standby falls behind on purpose
        try:
            with primary.owner() as conn:
                conn.execute(
                    "INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)"
                    " VALUES (%s, 'test', 'standby.lag', 'x', '{}')",
                    (a.tenant_id,),
                )
            time.sleep(1.5)
            with login(standby, a) as conn:
                is_standby, _, caught, lag = conn.execute(STATUS).fetchone()
                assert conn.execute("SELECT count(*) FROM reporting.audit_log").fetchone()[0] == before
            assert is_standby is True and caught is False and lag >= timedelta(seconds=1), lag
        finally:
            dba.execute("SELECT pg_wal_replay_resume()")
    caught_up(primary, standby)
    with login(standby, a) as conn:
        assert conn.execute("SELECT count(*) FROM reporting.audit_log").fetchone()[0] == before + 1
        assert conn.execute(STATUS).fetchone()[2:] == (True, timedelta(0))
