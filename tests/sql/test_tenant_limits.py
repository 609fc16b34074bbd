"""Limits that a tenant cannot talk around, in SQL as the API's role: the storage-target count
and config size (the trigger dlw.storage_target_limits), and repeats on the audit trail
(dlw.audit_repeat) that keep a flood of denials or refusals at O(1) rows."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from app import domain
from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant, tenant

INSERT_TARGET = "INSERT INTO dlw.storage_targets (tenant_id, name, config) VALUES (dlw.ctx_tenant_id(), %s, %s)"


def set_limit(db: MigratedDb, tenant_id: int, column: str, value: int) -> None:
    with db.owner() as owner:
        owner.execute(f"UPDATE dlw.tenants SET {column} = %s WHERE tenant_id = %s", (value, tenant_id))


def targets(db: MigratedDb, tenant_id: int) -> int:
    with db.owner() as owner:
        return int(
            owner.execute("SELECT count(*) FROM dlw.storage_targets WHERE tenant_id = %s", (tenant_id,)).fetchone()[0]
        )  # type: ignore[index]


def test_a_tenant_cannot_add_storage_targets_beyond_its_limit(db: MigratedDb):
    tid = tenant(db, "st-count")
    set_limit(db, tid, "quota_storage_targets", 3)
    with psycopg.connect(db.app_url) as conn:
        for name in ("two", "three"):
            as_tenant(conn, tid, "tenant_admin")
            conn.execute(INSERT_TARGET, (name, Jsonb({})))
            conn.commit()
        as_tenant(conn, tid, "tenant_admin")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(INSERT_TARGET, ("four", Jsonb({})))
        assert refused.value.sqlstate == "DLW02"
        conn.rollback()
        # deleting one makes room again; the limit holds for a superuser's insert too
        as_tenant(conn, tid, "tenant_admin")
        conn.execute("DELETE FROM dlw.storage_targets WHERE name = 'three'")
        conn.execute(INSERT_TARGET, ("four", Jsonb({})))
        conn.commit()
    with db.owner() as owner, pytest.raises(psycopg.Error) as refused:
        owner.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'five')", (tid,))
    assert refused.value.sqlstate == "DLW02"
    assert targets(db, tid) == 3
    set_limit(db, tid, "quota_storage_targets", 0)  # 0 = unlimited
    with db.owner() as owner:
        owner.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'five')", (tid,))


def test_concurrent_storage_target_inserts_never_pass_the_limit(db: MigratedDb):
    tid = tenant(db, "st-race")
    set_limit(db, tid, "quota_storage_targets", 5)  # the default target is one of them
    n = 30
    barrier = threading.Barrier(n, timeout=60)
    outcomes: list[Any] = [None] * n

    def worker(i: int) -> None:
        with psycopg.connect(db.app_url) as conn:
            as_tenant(conn, tid, "tenant_admin")
            barrier.wait()
            try:
                conn.execute(INSERT_TARGET, (f"t{i}", Jsonb({})))
                conn.commit()
                outcomes[i] = "ok"
            except psycopg.Error as exc:
                outcomes[i] = exc.sqlstate

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(outcomes) == ["DLW02"] * (n - 4) + ["ok"] * 4
    assert targets(db, tid) == 5


def test_adding_a_storage_target_is_refused_at_repeatable_read(db: MigratedDb):
    tid = tenant(db, "st-rr")
    with psycopg.connect(db.app_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        as_tenant(conn, tid, "tenant_admin")
        with pytest.raises(errors.InvalidTransactionState):
            conn.execute(INSERT_TARGET, ("rr", Jsonb({})))


def test_a_storage_target_config_cannot_exceed_its_size_limit(db: MigratedDb):
    tid = tenant(db, "st-size")
    limit = domain.STORAGE_TARGET_CONFIG_MAX_BYTES
    # The size is checked before the content (sql/22_storage_target_triggers.sql fires after the
    # limits): a config of exactly the limit gets past it and is then refused for its unknown
    # key (DLW20); one byte more is DLW03, on insert and on update alike.
    at_limit = {"k": "x" * (limit - len('{"k": ""}'))}  # as the database prints it: {"k": "xxx…"}
    with psycopg.connect(db.app_url) as conn:
        for sql, args, sqlstate in (
            (INSERT_TARGET, ("fits", Jsonb(at_limit)), "DLW20"),
            (INSERT_TARGET, ("big", Jsonb({"k": "x" * limit})), "DLW03"),
            (
                "UPDATE dlw.storage_targets SET config = %s WHERE name = 'default'",
                (Jsonb({**at_limit, "m": 1}),),
                "DLW03",
            ),
        ):
            as_tenant(conn, tid, "tenant_admin")
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(sql, args)
            assert refused.value.sqlstate == sqlstate
            conn.rollback()
    assert targets(db, tid) == 1


# ------------------------------------------------------------------------------------------
# Repeats on the audit trail
# ------------------------------------------------------------------------------------------


def test_500_repeats_leave_one_row_with_their_count(db: MigratedDb):
    tid = tenant(db, "repeats")
    with psycopg.connect(db.app_url) as conn:
        for i in range(500):
            as_tenant(conn, tid, "tenant_viewer", user="flooder")
            conn.execute(
                "SELECT dlw.audit_repeat('permission_denied', 'GET /api/v1/users', %s)",
                (Jsonb({"role": "tenant_viewer", "path": f"/try/{i}"}),),
            )
            conn.commit()
        # another actor, target or metric is another row
        as_tenant(conn, tid, "tenant_viewer", user="other")
        conn.execute("SELECT dlw.audit_repeat('permission_denied', 'GET /api/v1/users', '{}')")
        as_tenant(conn, tid, "tenant_viewer", user="flooder")
        conn.execute("SELECT dlw.audit_repeat('quota.exceeded', 'org/m', '{\"metric\": \"bytes_month\"}')")
        conn.execute("SELECT dlw.audit_repeat('quota.exceeded', 'org/m', '{\"metric\": \"tasks_per_minute\"}')")
        conn.commit()
    with db.owner() as owner:
        rows = owner.execute(
            "SELECT actor, action, coalesce(detail->>'metric', ''), count(*), sum(count), min(at) <= max(last_at)"
            " FROM dlw.audit_log WHERE tenant_id = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (tid,),
        ).fetchall()
    # a minute boundary during the loop may split the 500 into two rows, never more
    flooder = rows[0]
    assert flooder[:3] == ("flooder", "permission_denied", "") and flooder[3] <= 2 and flooder[4] == 500
    assert flooder[5] is True
    assert [(*r[:3], r[4]) for r in rows[1:]] == [
        ("flooder", "quota.exceeded", "bytes_month", 1),
        ("flooder", "quota.exceeded", "tasks_per_minute", 1),
        ("other", "permission_denied", "", 1),
    ]


def test_repeats_need_a_context_and_the_app_still_cannot_change_audit_rows(db: MigratedDb):
    tid = tenant(db, "repeats-locked")
    with psycopg.connect(db.app_url) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT dlw.audit_repeat('permission_denied', 'x', '{}')")
        conn.rollback()
        as_tenant(conn, tid, "tenant_admin")
        conn.execute("SELECT dlw.audit_repeat('permission_denied', 'x', '{}')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE dlw.audit_log SET count = 1")
        conn.rollback()


def _trail(db: MigratedDb, tenant_id: int) -> list[tuple[Any, ...]]:
    with db.owner() as owner:
        return owner.execute(
            "SELECT id, actor, action, target, count, last_at FROM dlw.audit_log WHERE tenant_id = %s ORDER BY id",
            (tenant_id,),
        ).fetchall()


def test_a_flood_of_failed_logins_leaves_a_bounded_number_of_rows_with_their_counts(db: MigratedDb):
    """Failed logins are denials too (issue 11, item 3): one repeat row per tenant, login subject,
    user and minute, through the same helper as the API's denials, never one row per attempt."""
    inactive = tenant(db, "logins-inactive")
    bystander = tenant(db, "logins-bystander")
    with psycopg.connect(db.app_url, autocommit=True) as app:
        # A user of a tenant that is then deactivated, and a bystander tenant with its own trail.
        login = "SELECT * FROM dlw.login_user('https://idp.test', %s, NULL, false, %s, 'tenant_viewer')"
        app.execute(login, ("dormant", "logins-inactive"))
        with db.owner() as owner:
            owner.execute("UPDATE dlw.tenants SET active = false WHERE tenant_id = %s", (inactive,))
        with app.transaction():
            as_tenant(app, bystander, "tenant_viewer", user="bystander-user")
            app.execute("SELECT dlw.audit_repeat('permission_denied', 'GET /api/v1/users', '{}')")
        bystander_before = _trail(db, bystander)
        attempts = 300
        for i in range(attempts):
            # no tenant for this identity (rows in the platform tenant), then the inactive tenant's user
            outcome = app.execute(
                "SELECT outcome FROM dlw.login_user('https://idp.test', 'mallory', %s, true, %s, 'tenant_admin')",
                (f"m{i}@evil.test", f"nowhere-{i}"),
            ).fetchone()
            assert outcome == ("TENANT_UNRESOLVED",)
            outcome = app.execute(
                "SELECT outcome FROM dlw.login_user('https://idp.test', 'dormant', NULL, false, NULL, NULL)"
            ).fetchone()
            assert outcome == ("TENANT_INACTIVE",)
        # another subject is another row
        app.execute("SELECT * FROM dlw.login_user('https://idp.test', 'trudy', NULL, false, 'nowhere', 'x')")
    platform = domain.PLATFORM_TENANT_ID
    with db.owner() as owner:
        rows = owner.execute(
            "SELECT tenant_id, actor, count(*), sum(count), min(minute) IS NOT NULL, bool_and(last_at >= at)"
            " FROM dlw.audit_log WHERE action = 'auth.login_denied' AND tenant_id IN (%s, %s)"
            " AND actor LIKE 'oidc:https://idp.test#%%' GROUP BY 1, 2 ORDER BY 1, 2",
            (platform, inactive),
        ).fetchall()
        first = owner.execute(
            "SELECT detail FROM dlw.audit_log WHERE action = 'auth.login_denied' AND actor = 'oidc:https://idp.test#mallory'"
            " ORDER BY at LIMIT 1"
        ).fetchone()
    by_actor = {(r[0], r[1]): r[2:] for r in rows}
    # a minute boundary during the loop may split a run into two rows, never more
    mallory = by_actor[(platform, "oidc:https://idp.test#mallory")]
    dormant = by_actor[(inactive, "oidc:https://idp.test#dormant")]
    trudy = by_actor[(platform, "oidc:https://idp.test#trudy")]
    assert mallory[0] <= 2 and mallory[1] == attempts and mallory[2:] == (True, True), mallory
    assert dormant[0] <= 2 and dormant[1] == attempts and dormant[2:] == (True, True), dormant
    assert trudy[:2] == (1, 1)
    # the repeat row keeps the first attempt's detail
    assert first is not None and first[0]["email"] == "m0@evil.test" and first[0]["reason"] == "TENANT_UNRESOLVED"
    assert _trail(db, bystander) == bystander_before
