"""The grant-reload part of bench/scale.py: an API instance's Authorizer (app/authz/authorizer.py,
the real one, on an asyncpg pool as dlw_app, listening as production does) at 10 and at 10,000
grants in dlw.casbin_rule.

  full load       what every change cost before issue 16 (and still costs after a reconnect)
  change lands    one INSERT of a grant (superuser, autocommit) until the instance's version
                  reached it: notification, debounce (0.1 s), the incremental catch-up
  burst           100 single-row statements in a row: how many policy updates the instance made
  decision        acting_role() for a principal, per call (the cached dict lookups of a request)

Targets: a change lands within 1 s at 10,000 grants, and the incremental catch-up (one query plus
applying the changed rules to the PolicyIndex, app/authz/policy_index.py) of a grant and of a
revocation each costs at most 2x at 10,000 what it costs at 10 (work proportional to the change,
not to the grants). Before the PolicyIndex, pycasbin scanned its rule list on every add and every
role it knew on every revoke: 1.06 -> 5.06 ms per grant, 0.85 -> 42.3 ms per revoke.

Alone: `python -m bench.scale_grants [--quick]` (its own embedded cluster).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import asyncpg
import psycopg

from app.authz.authorizer import Authorizer
from app.identity.principal import Principal
from bench.load import print_table_head

LAND_MAX_S = 1.0
CATCH_UP_MAX = 2.0


def _grants(admin_url: str, count: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:scale-%'")
        conn.execute(
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1)"
            " SELECT 'g', 'user:scale-' || g, 'tenant_operator' FROM generate_series(1, %s) g",
            (count,),
        )


async def _until(done: Any, limit_s: float = 10.0) -> None:
    """Polls done() until true (the Authorizer exposes counters, not events)."""
    deadline = time.monotonic() + limit_s
    for _ in iter(int, 1):
        if done():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the authorizer did not catch up")
        await asyncio.sleep(0.002)


async def _measure(admin_url: str, app_url: str, grants: int, reps: int) -> dict[str, Any]:
    _grants(admin_url, grants)
    pool = await asyncpg.create_pool(app_url, min_size=1, max_size=2)
    authz = Authorizer(pool)
    try:
        await authz.start(app_url)
        await _until(lambda: authz.reloads >= 2)  # the start's load, then the one after the listener connected
        await asyncio.sleep(0.3)
        full = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await authz.reload()
            full.append(time.perf_counter() - t0)
        land, catch_up, revoke = [], [], []
        with psycopg.connect(admin_url, autocommit=True) as conn:
            for i in range(reps):
                conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', %s, 'tenant_admin')",
                             (f"user:scale-new-{i}",))  # fmt: skip
                target = conn.execute("SELECT version FROM dlw.grant_version").fetchone()[0]  # type: ignore[index]
                t0 = time.perf_counter()
                await _until(lambda target=target: authz.version == target)
                land.append(time.perf_counter() - t0)
                # The catch-up alone, on a change the instance has not seen yet: a revocation,
                # then a grant (the listener's own check, 0.1 s later, finds nothing left to do).
                conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 = %s", (f"user:scale-new-{i}",))
                t0 = time.perf_counter()
                await authz.refresh()
                revoke.append(time.perf_counter() - t0)
                await asyncio.sleep(0.15)
                conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', %s, 'tenant_admin')",
                             (f"user:scale-add-{i}",))  # fmt: skip
                t0 = time.perf_counter()
                await authz.refresh()
                catch_up.append(time.perf_counter() - t0)
                await asyncio.sleep(0.15)
            conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:scale-add-%'")
            await asyncio.sleep(0.2)
            before, full_before = authz.reloads, authz.full_reloads
            for i in range(100):
                conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', %s, 'tenant_viewer')",
                             (f"user:scale-burst-{i}",))  # fmt: skip
            target = conn.execute("SELECT version FROM dlw.grant_version").fetchone()[0]  # type: ignore[index]
            await _until(lambda target=target: authz.version == target)
            await asyncio.sleep(0.3)
            burst_updates, burst_full = authz.reloads - before, authz.full_reloads - full_before
            conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:scale-burst-%'")
        principal = Principal(user_id="scale-7", role="tenant_viewer", tenant_id=1)
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            authz.acting_role(principal, "/api/v1/tasks", "POST", True)
        decision_us = (time.perf_counter() - t0) / n * 1e6
        granted = authz.acting_role(principal, "/api/v1/tasks", "POST", True)
    finally:
        await authz.stop()
        await pool.close()
    return {
        "grants": grants,
        "full_ms": statistics.median(full) * 1000,
        "land_ms": statistics.median(land) * 1000,
        "land_max_ms": max(land) * 1000,
        "catch_up_ms": statistics.median(catch_up) * 1000,
        "revoke_ms": statistics.median(revoke) * 1000,
        "burst_updates": burst_updates,
        "burst_full": burst_full,
        "decision_us": decision_us,
        "granted": granted,
    }


def run(admin_url: str, app_url: str, quick: bool = False) -> list[dict[str, Any]]:
    reps = 10 if quick else 20
    small, large = (asyncio.run(_measure(admin_url, app_url, g, reps)) for g in (10, 10_000))
    print("\nGrant reload (one API instance's Authorizer, median)")
    print_table_head(
        f"{'grants':>7} {'full load ms':>12} {'change lands ms':>15} {'(max)':>7} {'grant ms':>8} {'revoke ms':>9}"
        f" {'burst of 100: updates':>21} {'(full)':>6} {'decision µs':>11}"
    )
    for r in (small, large):
        print(
            f"{r['grants']:>7,} {r['full_ms']:>12.1f} {r['land_ms']:>15.1f} {r['land_max_ms']:>7.1f}"
            f" {r['catch_up_ms']:>8.2f} {r['revoke_ms']:>9.2f} {r['burst_updates']:>21} {r['burst_full']:>6}"
            f" {r['decision_us']:>11.2f}"
        )
    print(f"(the granted principal acts as {large['granted']!r}: the grants are live)")
    print("grant/revoke ms = the incremental catch-up alone (app/authz/authorizer.py: one query + the changed")
    print("rules applied to the PolicyIndex, O(1) each); full load = every rule read and indexed (gaps only).")
    grant = large["catch_up_ms"] / small["catch_up_ms"]
    revoke = large["revoke_ms"] / small["revoke_ms"]
    land_s = large["land_max_ms"] / 1000
    rows = [
        {"measure": "grant catch-up: 10 -> 10,000 grants", "small_ms": small["catch_up_ms"],
         "large_ms": large["catch_up_ms"], "ratio": grant, "target": CATCH_UP_MAX, "met": grant <= CATCH_UP_MAX},
        {"measure": "revoke catch-up: 10 -> 10,000 grants", "small_ms": small["revoke_ms"],
         "large_ms": large["revoke_ms"], "ratio": revoke, "target": CATCH_UP_MAX, "met": revoke <= CATCH_UP_MAX},
        {"measure": "grant lands at 10,000 grants (max, s)", "small_ms": small["land_max_ms"],
         "large_ms": large["land_max_ms"], "ratio": land_s, "target": LAND_MAX_S, "met": land_s <= LAND_MAX_S},
    ]  # fmt: skip
    for r in rows:
        print(f"{r['measure']:44} {r['ratio']:>6.2f} <= {r['target']:g}  {'met' if r['met'] else 'MISSED'}")
    return rows


if __name__ == "__main__":
    import argparse
    import secrets

    from psycopg import sql

    from bench.refresh_cost import migrated_cluster

    parser = argparse.ArgumentParser(prog="python -m bench.scale_grants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    password = secrets.token_urlsafe(12)
    with migrated_cluster("dlw-bench-grants-", "scale_grants") as cluster:
        with psycopg.connect(cluster.url("scale_grants"), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(password)))
        run(cluster.url("scale_grants"), cluster.url("scale_grants", user="dlw_app", password=password), args.quick)
