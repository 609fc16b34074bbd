"""The executor claim in SQL (sql/41_executor_claim.sql), driven as the API's role dlw_app with an
executor context, exactly as the routes call it: fair across tenants, fresh tokens, disjoint and
never waiting, scoped to the token's tenant, callable from an executor context only.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.support.executor_sql import (
    SHA,
    Executor,
    empty_queue,
    ex,
    file_row,
    make_task,
    owner,
    provision,
    task_status,
    usage,
)
from tests.support.tenants import as_tenant

__all__ = ["empty_queue", "ex", "owner"]  # shared fixtures (tests/support/executor_sql.py; empty_queue: autouse)


def test_claim_is_fair_across_tenants_and_in_priority_order_within_one(db, owner, ex):
    busy, small1, small2 = provision(db, "fair-busy"), provision(db, "fair-s1"), provision(db, "fair-s2")
    _, bulk = make_task(db, busy, 30, priority=0)
    _, urgent = make_task(db, busy, 3, priority=5, repo="org/urgent")
    make_task(db, small1, 2)
    make_task(db, small2, 2)

    # One busy tenant with 33 queued files does not starve the others: with equal leases in
    # flight, each round serves every tenant once, the busy one with its highest priority first.
    rounds = [ex.claim(3), ex.claim(3)]
    for got in rounds:
        assert sorted(r["tenant_id"] for r in got) == sorted([busy, small1, small2])
    busy_claims = [r["file_id"] for got in rounds for r in got if r["tenant_id"] == busy]
    assert set(busy_claims) <= set(urgent)
    # The small tenants are drained; the busy one gets everything, urgent files before bulk ones.
    rest = ex.claim(5)
    assert [r["tenant_id"] for r in rest] == [busy] * 5
    assert [r["file_id"] for r in rest][:1] == [f for f in urgent if f not in busy_claims]
    assert {r["file_id"] for r in rest[1:]} <= set(bulk)
    for r in rest:
        assert r["tenant_slug"] == "fair-busy" and r["attempts"] == 1 and r["lease_seconds"] == 60
        assert r["repo_id"] in ("org/m", "org/urgent") and r["revision"] == "main"

    # A tenant with fewer leases in flight is served first, one file at a time too.
    late = provision(db, "fair-late")
    make_task(db, late, 3)
    assert [r["tenant_id"] for r in ex.claim(1)] == [late]
    assert [r["tenant_id"] for r in ex.claim(1)] == [late]
    assert sorted(r["tenant_id"] for r in ex.claim(2)) == sorted([late, busy])


def test_a_claim_assigns_fresh_tokens_and_starts_the_task(db, owner, ex):
    tid = provision(db, "claim-shape")
    task, files = make_task(db, tid, [{"path": "a.bin", "size": 7, "sha256": SHA}, {"path": "b.bin", "size": 9}])
    got = ex.claim(10, lease=30)
    assert {r["file_id"] for r in got} == set(files) and {r["task_id"] for r in got} == {task}
    assert {r["path"]: (r["size"], r["sha256"]) for r in got} == {"a.bin": (7, SHA), "b.bin": (9, None)}
    assert len({r["assignment_token"] for r in got}) == 2
    assert task_status(owner, task) == "running"
    for r in got:
        row = file_row(owner, r["file_id"])
        assert row["status"] == "assigned" and row["assignment_token"] == r["assignment_token"]
        assert row["executor_id"] == "exec-1/test" and row["lease_expires_at"] == r["lease_expires_at"]
        left = (r["lease_expires_at"] - owner.execute("SELECT clock_timestamp() AS t").fetchone()["t"]).total_seconds()
        assert 25 < left <= 30
    assert ex.claim(10) == []


def test_concurrent_claims_get_disjoint_files_and_never_wait(db, owner):
    tid = provision(db, "concurrent")
    make_task(db, tid, 12)
    a, b = Executor(db, subject="a"), Executor(db, subject="b")
    try:
        assert len(a.claim(1)) == 1  # the task is running now
        a.conn.execute("BEGIN")
        as_tenant(a.conn, 0, "executor", user="a")
        first = a.conn.execute("SELECT * FROM dlw.executor_claim(5, 60)").fetchall()
        # While a's claim is uncommitted (its files locked), b neither waits nor gets the same files.
        b.conn.execute("SET lock_timeout = '200ms'")
        started = time.monotonic()
        second = b.claim(5)
        assert time.monotonic() - started < 1
        a.conn.execute("COMMIT")
        assert len(first) == 5 and len(second) == 5
        assert not {r["file_id"] for r in first} & {r["file_id"] for r in second}
        assert owner.execute(
            "SELECT count(*) AS n, count(DISTINCT assignment_token) AS tokens FROM dlw.task_files"
            " WHERE tenant_id = %s AND status = 'assigned'",
            (tid,),
        ).fetchone() == {"n": 11, "tokens": 11}
    finally:
        a.close()
        b.close()


def test_a_tenant_limited_executor_only_ever_sees_its_tenant(db, owner, ex):
    mine, theirs = provision(db, "scope-mine"), provision(db, "scope-theirs")
    make_task(db, mine, 2)
    their_task, their_files = make_task(db, theirs, 2)
    limited = Executor(db, tenant=mine, subject="limited")
    try:
        got = limited.claim(10)
        assert {r["tenant_id"] for r in got} == {mine} and len(got) == 2
        # Even holding the real token of another tenant's file, it cannot touch it.
        held = ex.claim(10)
        assert {r["tenant_id"] for r in held} == {theirs}
        before = [file_row(owner, f) for f in their_files]
        for r in held:
            file, token = r["file_id"], r["assignment_token"]
            assert limited.heartbeat(file, token, 5) == "NOT_FOUND"
            assert limited.complete(file, token) == ("NOT_FOUND", None)
            assert limited.fail(file, token, retryable=False) == ("NOT_FOUND", None)
            assert limited.release(file, token) == "NOT_FOUND"
        assert [file_row(owner, f) for f in their_files] == before
        assert task_status(owner, their_task) == "running" and usage(owner, their_task) == []
    finally:
        limited.close()


def test_only_an_executor_context_may_call_the_executor_functions(db):
    tid = provision(db, "roles")
    make_task(db, tid, 1)
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        for context in ((tid, "tenant_admin"), (tid, "system_admin"), (None, None)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SELECT dlw.set_context(%s, 'x', %s)", context)
                conn.execute("SELECT * FROM dlw.executor_claim(1, 60)")
        for function in ("dlw.executor_scope()", "dlw.executor_sweep_expired_leases(bigint, integer, integer)"):
            assert not conn.execute("SELECT has_function_privilege('dlw_app', %s, 'EXECUTE')", (function,)).fetchone()[
                0
            ]
        for role in ("dlw_reporting", "dlw_admin"):
            assert not conn.execute(
                "SELECT has_function_privilege(%s, 'dlw.executor_claim(integer, integer, text, integer)', 'EXECUTE')",
                (role,),
            ).fetchone()[0]
        with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
            as_tenant(conn, 0, "executor", user="x")
            conn.execute("SELECT * FROM dlw.executor_claim(0, 60)")


def test_reporting_logins_never_see_assignment_tokens(db):
    with db.owner() as conn:
        privileges = conn.execute(
            "SELECT has_column_privilege('dlw_reporting', 'dlw.task_files', 'assignment_token', 'SELECT'),"
            " has_column_privilege('dlw_reporting', 'dlw.task_files', 'lease_seconds', 'SELECT')"
        ).fetchone()
    assert privileges == (False, True)
