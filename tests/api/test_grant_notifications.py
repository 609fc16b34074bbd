"""The grant-change channel: any role that can connect may NOTIFY dlw_casbin_rule, so a flood
of foreign notifications must cost no reload and no throughput, and the notifications the
trigger sends must carry nothing a listener could learn another tenant's grants from.
The throughput target itself (flooded within 10 % of normal) is measured by the benchmark
(`./run bench --only notify`, bench/notify_flood.py), not asserted here."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.factory import create_app
from app.authz.authorizer import CHANNEL, Authorizer
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.psql import PSQL
from tests.support.tenants import SeededTenant, drop_login, seed_tenant

ROUNDS = 7
WINDOW_SECONDS = 1.0
# One flood statement sends this many notifications (distinct payloads: PostgreSQL folds
# identical ones within a transaction), then the login sleeps a little: about 1,000 a second
# (on two cores a faster psql flood mostly measures the CPU it takes from the API itself).
BURST = 100
PAUSE_SECONDS = 0.1
# A platform with many grants, so that a reload costs what it would in production.
GRANTS = 3000


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> Iterator[tuple[SeededTenant, SeededTenant]]:
    """Tenant A's reporting login is the listener / flooder; tenant B's grants are the secret."""
    a = seed_tenant(db, "notify-a")
    b = seed_tenant(db, "notify-b-secret")
    try:
        yield a, b
    finally:
        drop_login(db, a.login)
        drop_login(db, b.login)


@pytest.fixture
def many_grants(db: MigratedDb) -> Iterator[None]:
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1)"
            " SELECT 'g', 'user:bulk-' || g, 'tenant_viewer' FROM generate_series(1, %s) g",
            (GRANTS,),
        )
    yield
    with db.owner() as conn:
        conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:bulk-%'")


def grant_version(db: MigratedDb) -> int:
    with db.owner() as conn:
        row = conn.execute("SELECT version FROM dlw.grant_version").fetchone()
    assert row is not None
    return int(row[0])


@contextmanager
def flood(url: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A reporting login in psql sending bursts of pg_notify on the grant channel for a bounded
    time (its own process, so the flood does not share this process's interpreter)."""
    statement = (
        f"SELECT count(pg_notify('{CHANNEL}', 'flood-' || g)) FROM generate_series(1, {BURST}) g;"
        f" SELECT pg_sleep({PAUSE_SECONDS});\n"
    )
    script = statement * max(1, round(seconds / PAUSE_SECONDS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        [PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(script)
    proc.stdin.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


def wait_settled(authz: Authorizer, limit: float = 10.0) -> None:
    """Until the two loads of a start are done: the first, and the one after the listener connected."""
    deadline = time.monotonic() + limit
    while authz.reloads < 2:
        assert time.monotonic() < deadline, "the authorizer never reloaded after its listener connected"
        time.sleep(0.01)
    time.sleep(0.2)


def wait_for_flood(authz: Authorizer, proc: subprocess.Popen[str], limit: float = 10.0) -> None:
    """Until the listener has received the flood's first burst."""
    seen = authz.notifications
    deadline = time.monotonic() + limit
    while authz.notifications < seen + BURST:
        if proc.poll() is not None:
            raise AssertionError(f"the flood stopped early ({proc.returncode}): {proc.stderr and proc.stderr.read()}")
        assert time.monotonic() < deadline, "the flood never reached the listener"
        time.sleep(0.01)


def requests_per_second(client: TestClient, headers: dict[str, str]) -> float:
    """Sequential requests to a cheap authenticated route (bearer token + require_perm)."""
    count = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < WINDOW_SECONDS:
        response = client.get("/api/v1/auth/me", headers=headers)
        assert response.status_code == 200, response.text
        count += 1
    return count / elapsed


def test_a_flood_of_foreign_notifications_reloads_nothing_and_keeps_throughput(
    db: MigratedDb, tenants: tuple[SeededTenant, SeededTenant], many_grants: None
):
    a, _ = tenants
    reporting_url = db.url(a.login, a.password)
    viewer = bearer(token(1, "tenant_viewer", user_id="flood-watcher"))
    version = grant_version(db)
    normal: list[float] = []
    flooded: list[float] = []
    with TestClient(create_app(app_settings(db))) as client:
        authz: Authorizer = client.app.state.authz  # type: ignore[attr-defined]
        wait_settled(authz)
        assert authz.version == version
        reloads, checks, notified = authz.reloads, authz.version_checks, authz.notifications
        for i in range(ROUNDS):
            for flooding in (False, True) if i % 2 == 0 else (True, False):
                if not flooding:
                    normal.append(requests_per_second(client, viewer))
                    continue
                with flood(reporting_url, WINDOW_SECONDS + 2) as proc:
                    wait_for_flood(authz, proc)
                    flooded.append(requests_per_second(client, viewer))
                time.sleep(0.3)  # let the last notifications drain before the next window
        received = authz.notifications - notified
        extra_reloads = authz.reloads - reloads
        checks = authz.version_checks - checks
    # Each round measures both side by side (order alternating), so load on the shared machine
    # that drifts between rounds cancels out in that round's ratio; the median round counts.
    ratio = statistics.median(f / n for n, f in zip(normal, flooded, strict=True))
    print(
        f"\n{received} foreign notifications, {extra_reloads} reloads, {checks} version checks;"
        f" best {max(normal):.0f} req/s normal, {max(flooded):.0f} req/s flooded, median round ratio {ratio:.3f}"
        f"\nnormal {[round(r) for r in normal]}\nflooded {[round(r) for r in flooded]}"
    )
    assert grant_version(db) == version
    # The flood was real: thousands of foreign notifications reached the listener. The psql flooder
    # delivers 8-10 bursts per window depending on the machine (6,000-6,900 seen against 7,000 in
    # a lone CI run), so the guard asks for 5 per round; what is under test is the zero below.
    assert received >= ROUNDS * BURST * 5, f"the flood did not reach the listener ({received})"
    assert extra_reloads == 0
    # One tiny query per debounce at most, not one per notification.
    assert checks <= received / BURST
    # A reload per notification measured 0.02 here. The target (within 10 %) holds when this
    # test runs alone (0.94-1.07) but not reliably inside the whole suite on two cores, where the
    # flood's own psql and backend take CPU from the API (0.87 seen): the suite asserts what tells
    # coalescing from per-message work; the 10 % figure is measured by `./run bench --only notify`
    # (bench/notify_flood.py, against a real `dlw serve`; see bench/README.md).
    assert ratio >= 0.5, f"throughput under the flood is {ratio:.0%} of normal"


def test_a_grant_lands_within_a_second_during_a_flood(db: MigratedDb, tenants: tuple[SeededTenant, SeededTenant]):
    a, _ = tenants
    viewer = bearer(token(1, "tenant_viewer", user_id="flood-promoted"))
    with TestClient(create_app(app_settings(db))) as client:
        authz: Authorizer = client.app.state.authz  # type: ignore[attr-defined]
        wait_settled(authz)
        assert client.get("/api/v1/users", headers=viewer).status_code == 403
        with flood(db.url(a.login, a.password), 5) as proc:
            wait_for_flood(authz, proc)
            reloads = authz.reloads
            with db.owner() as conn:
                conn.execute(
                    "INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:flood-promoted', 'tenant_admin')"
                )
            started = time.monotonic()
            while client.get("/api/v1/users", headers=viewer).status_code != 200:
                assert time.monotonic() - started < 1.0, "the grant did not land within a second"
                time.sleep(0.02)
            time.sleep(0.5)
            assert authz.reloads - reloads == 1, authz.reloads - reloads
        with db.owner() as conn:
            conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 = 'user:flood-promoted'")


def test_grant_notifications_carry_no_rule_data(db: MigratedDb, tenants: tuple[SeededTenant, SeededTenant]):
    """Tenant A's reporting login listens while tenant B's user is granted and revoked a role,
    by a DBA function and directly: it gets empty payloads, and cannot read the counter."""
    a, b = tenants
    version = grant_version(db)
    with psycopg.connect(db.url(a.login, a.password), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with db.owner() as conn:
            conn.execute("SELECT dlw_admin.grant_role(%s, %s, 'tenant_operator')", (b.slug, str(b.ids["user"])))
            conn.execute("SELECT dlw_admin.revoke_role(%s, %s, 'tenant_operator')", (b.slug, str(b.ids["user"])))
            conn.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', %s, 'tenant_admin')", (b.slug,))
            conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 = %s", (b.slug,))
        payloads = [n.payload for n in listener.notifies(timeout=2, stop_after=4)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            listener.execute("SELECT version FROM dlw.grant_version")
    assert payloads == ["", "", "", ""]
    assert grant_version(db) == version + 4  # one bump per changing statement
