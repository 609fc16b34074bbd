"""Storage target config and roots in SQL, as the API's role (sql/19_storage_roots.sql): the
config is validated (absolute normalized root, known layout, no secret-named key), and two
tenants' roots are never the same directory or nested, also under concurrent inserts; the
registry is invisible to tenants, and a refusal names nobody else's root."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from app import domain
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

INSERT = "INSERT INTO dlw.storage_targets (tenant_id, name, config) VALUES (dlw.ctx_tenant_id(), %s, %s) RETURNING id"


def insert(db: MigratedDb, tid: int, name: str, config: dict[str, Any]) -> str | None:
    """The SQLSTATE the insert raised, or None when it committed."""
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_admin")
        try:
            conn.execute(INSERT, (name, Jsonb(config)))
        except psycopg.Error as exc:
            return exc.sqlstate
        conn.commit()
    return None


def test_layouts_in_sql_and_python_agree(db: MigratedDb):
    with db.owner() as conn:
        assert tuple(conn.execute("SELECT dlw.storage_layouts()").fetchone()[0]) == domain.STORAGE_LAYOUTS  # type: ignore[index]


@pytest.mark.parametrize(
    ("config", "sqlstate"),
    [
        ({"root": "relative/dir"}, "DLW22"),
        ({"root": "/"}, "DLW22"),
        ({"root": "/srv/dlw/"}, "DLW22"),
        ({"root": "/srv//dlw"}, "DLW22"),
        ({"root": "/srv/../etc"}, "DLW22"),
        ({"root": "/srv/./dlw"}, "DLW22"),
        ({"root": "/srv/dl\nw"}, "DLW22"),
        ({"root": "/" + "x" * 1100}, "DLW22"),
        ({"root": 5}, "DLW22"),
        ({"root": "/srv/a", "layout": "flat"}, "DLW23"),
        ({"layout": ["tree"]}, "DLW23"),
        ({"root": "/srv/a", "token": "hf_x"}, "DLW21"),
        ({"Password": "x"}, "DLW21"),
        ({"aws_secret_access_key": "x"}, "DLW21"),
        ({"path": "/srv/a"}, "DLW20"),
    ],
)
def test_bad_configs_are_refused_with_their_code(db: MigratedDb, config: dict[str, Any], sqlstate: str):
    tid = tenant(db, "st-config")
    assert insert(db, tid, "bad", config) == sqlstate


def test_good_configs_and_the_default(db: MigratedDb):
    tid = tenant(db, "st-good")
    assert insert(db, tid, "tree", {"root": "/srv/st-good/tree"}) is None
    assert insert(db, tid, "cache", {"root": "/srv/st-good/hf", "layout": "hf-cache"}) is None
    assert insert(db, tid, "default-cache", {"layout": "hf-cache"}) is None  # under the executor's default storage
    # the same tenant may nest its own roots
    assert insert(db, tid, "inner", {"root": "/srv/st-good/tree/inner", "layout": "tree"}) is None


def test_two_tenants_roots_never_equal_or_nest(db: MigratedDb):
    a, b = tenant(db, "st-iso-a"), tenant(db, "st-iso-b")
    assert insert(db, a, "mine", {"root": "/data/iso/a"}) is None
    for root in ("/data/iso/a", "/data/iso/a/sub", "/data/iso", "/data"):
        assert insert(db, b, "theirs", {"root": root}) == "DLW24", root
    assert insert(db, b, "theirs", {"root": "/data/iso/ab"}) is None  # a sibling with a longer name is fine
    assert insert(db, b, "theirs2", {"root": "/data/iso/a-b"}) is None
    # an update is checked like an insert, and a freed root can be taken
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, b, "tenant_admin")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(
                "UPDATE dlw.storage_targets SET config = %s WHERE name = 'theirs'", (Jsonb({"root": "/data/iso/a/x"}),)
            )
        assert refused.value.sqlstate == "DLW24"
        # the message says neither whose root nor which
        assert "st-iso-a" not in str(refused.value) and "/data/iso/a" not in str(refused.value)
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, a, "tenant_admin")
        conn.execute("DELETE FROM dlw.storage_targets WHERE name = 'mine'")
        conn.commit()
    assert insert(db, b, "now-mine", {"root": "/data/iso/a/sub"}) is None


def test_tenants_cannot_read_the_registry_or_other_tenants_targets(db: MigratedDb):
    a, b = tenant(db, "st-see-a"), tenant(db, "st-see-b")
    assert insert(db, a, "hidden", {"root": "/data/see/a"}) is None
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, b, "tenant_admin")
        assert conn.execute("SELECT count(*) FROM dlw.storage_roots").fetchone() == (0,)  # its own only: none
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM dlw.storage_roots")
        conn.rollback()
        as_tenant(conn, b, "tenant_admin")
        assert conn.execute("SELECT count(*) FROM dlw.storage_targets WHERE name = 'hidden'").fetchone() == (0,)
        # the sync function acts only for the tenant in context
        target = None
        with db.owner() as owner:
            target = owner.execute(
                "SELECT id FROM dlw.storage_targets WHERE tenant_id = %s AND name = 'hidden'", (a,)
            ).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT dlw.storage_root_sync(%s, %s)", (a, target[0]))  # type: ignore[index]


def test_concurrent_overlapping_roots_of_two_tenants_admit_one(db: MigratedDb):
    tenants = [tenant(db, f"st-race-{i}") for i in range(6)]
    barrier = threading.Barrier(len(tenants), timeout=60)
    outcomes: list[str | None] = [None] * len(tenants)

    def worker(i: int) -> None:
        with psycopg.connect(db.app_url) as conn:
            as_tenant(conn, tenants[i], "tenant_admin")
            barrier.wait()
            try:
                # nested in one another: /data/race, /data/race/1, /data/race/1/2, ...
                conn.execute(INSERT, ("race", Jsonb({"root": "/data/race" + "".join(f"/{k}" for k in range(i))})))
                conn.commit()
                outcomes[i] = "ok"
            except psycopg.Error as exc:
                outcomes[i] = exc.sqlstate

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(tenants))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcomes, key=str) == ["DLW24"] * (len(tenants) - 1) + ["ok"], outcomes
    with db.owner() as owner:
        assert owner.execute("SELECT count(*) FROM dlw.storage_roots WHERE root LIKE '/data/race%'").fetchone() == (1,)


def test_roots_cannot_be_set_at_repeatable_read(db: MigratedDb):
    tid = tenant(db, "st-rr")
    with psycopg.connect(db.app_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        as_tenant(conn, tid, "tenant_admin")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(INSERT, ("rr", Jsonb({"root": "/data/rr"})))
        assert refused.value.sqlstate == "25000"
