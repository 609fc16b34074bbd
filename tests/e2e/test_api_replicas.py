"""Three `dlw serve` processes on one database (issue 12, item 6): exactly one snapshot leader at
a time, a frozen (SIGSTOP) or killed (SIGKILL) leader replaced within a bounded time, grants
reaching all three within a second, and the quota holding under a burst spread round-robin.

The tests run in file order on one module-wide trio: the leader is stopped, then killed, last."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support import server
from tests.support.database import MigratedDb, free_port
from tests.support.deployment import (
    add_usage,
    admission_burst,
    folded,
    grant_round_trip,
    leader_pids,
    wait_for,
)
from tests.support.tenants import tenant

INTERVAL, RETRY = 1.0, 1.0
IDLE_LIMIT = 3.0  # the leader session's idle limit: max(3 probes of min(5, interval, retry) s, 3 s)


@dataclass
class Trio:
    db: MigratedDb
    procs: dict[int, subprocess.Popen[str]]
    bases: dict[int, str]
    most_leaders_seen: int = 0
    leaders_seen: list[int] = field(default_factory=list)

    def leader(self) -> int | None:
        """The current leader's pid, recording what every sample saw (never two at once)."""
        pids = leader_pids(self.db)
        self.most_leaders_seen = max(self.most_leaders_seen, len(pids))
        if pids and (not self.leaders_seen or self.leaders_seen[-1] != pids[0]):
            self.leaders_seen.append(pids[0])
        return pids[0] if len(pids) == 1 else None


@pytest.fixture(scope="module")
def trio(db: MigratedDb) -> Iterator[Trio]:
    env = server.serve_env(
        db,
        DLW_SNAPSHOT_INTERVAL_SECONDS=str(INTERVAL),
        DLW_SNAPSHOT_LEADER_RETRY_SECONDS=str(RETRY),
        DLW_QUOTA_LOCK_TIMEOUT_MS="30000",
        DLW_DB_POOL_MAX_SIZE="10",
    )
    ports = [free_port() for _ in range(3)]
    procs = [server.start(env, port) for port in ports]
    try:
        for proc, port in zip(procs, ports, strict=True):
            server.wait_ready(proc, port, timeout=90)  # three start at once on a busy 2-core machine
        yield Trio(
            db=db,
            procs={p.pid: p for p in procs},
            bases={p.pid: f"http://127.0.0.1:{port}" for p, port in zip(procs, ports, strict=True)},
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            server.stop(proc)


def runner_sessions(db: MigratedDb) -> set[int]:
    """The pids of the API processes with a snapshot-runner session open."""
    with db.owner() as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'dlw-snapshot-runner:%'"
        ).fetchall()
    return {int(r[0].rsplit(":", 1)[1]) for r in rows}


def test_exactly_one_of_three_leads(db: MigratedDb, trio: Trio):
    wait_for(lambda: trio.leader() in trio.procs, 15)
    wait_for(lambda: runner_sessions(db) == set(trio.procs), 15)  # all three compete
    first = trio.leader()
    deadline = time.monotonic() + 3 * INTERVAL
    while time.monotonic() < deadline:  # a steady leader, and never a second one
        assert trio.leader() == first
        time.sleep(0.1)
    xid = add_usage(db, tenant(db, "trio-usage"), 5)
    print(f"leader of 3: pid {first}; usage folded after {wait_for(lambda: folded(db, xid), 5):.1f} s")
    assert trio.most_leaders_seen == 1


def test_a_grant_reaches_all_three_within_a_second(db: MigratedDb, trio: Trio):
    granted, revoked = grant_round_trip(db, list(trio.bases.values()), "trio-promoted")
    print("grant on 3 replicas: visible after " + ", ".join(f"{s:.2f}" for s in granted)
          + " s; revoked after " + ", ".join(f"{s:.2f}" for s in revoked) + " s")  # fmt: skip
    assert max(granted) < 1.0 and max(revoked) < 1.0, (granted, revoked)


def test_the_quota_holds_under_a_burst_spread_over_the_three(db: MigratedDb, trio: Trio):
    figures = admission_burst(db, list(trio.bases.values()), "trio")
    print(f"admission burst round-robin over 3 replicas: {figures}")
    assert figures["over_admitted"] == 0 and figures["other"] == 0


def _handover(db: MigratedDb, trio: Trio, sig: signal.Signals) -> tuple[int, int, float]:
    """Send `sig` to the leader; (old leader, new leader, seconds until the new one led and had
    folded a usage event committed after the signal)."""
    wait_for(lambda: trio.leader() in trio.procs, 15)
    old = trio.leader()
    assert old is not None
    trio.procs[old].send_signal(sig)
    sent = time.monotonic()
    xid = add_usage(db, tenant(db, f"trio-{sig.name.lower()}"), 9)
    wait_for(lambda: trio.leader() not in (None, old), 30, step=0.05)
    new = trio.leader()
    assert new is not None and new != old
    wait_for(lambda: folded(db, xid), 10, step=0.05)
    return old, new, time.monotonic() - sent


def test_a_frozen_leader_is_replaced_within_its_idle_limit_plus_a_retry(db: MigratedDb, trio: Trio):
    old, new, seconds = _handover(db, trio, signal.SIGSTOP)
    try:
        print(f"SIGSTOP leader {old}: pid {new} leads and refreshed after {seconds:.1f} s "
              f"(idle limit {IDLE_LIMIT:.0f} s + retry {RETRY:.0f} s)")  # fmt: skip
        assert seconds < IDLE_LIMIT + RETRY + 4, seconds
    finally:
        trio.procs[old].send_signal(signal.SIGCONT)
    # Resumed, the old leader finds its session gone, competes again and stays a follower.
    wait_for(lambda: old in runner_sessions(db), 15)
    for _ in range(20):
        assert trio.leader() == new
        time.sleep(0.1)
    assert httpx.get(f"{trio.bases[old]}/readyz", timeout=5).status_code == 200
    assert trio.most_leaders_seen == 1


def test_a_killed_leader_is_replaced_within_a_retry(db: MigratedDb, trio: Trio):
    old, new, seconds = _handover(db, trio, signal.SIGKILL)
    trio.procs[old].wait(10)
    print(f"SIGKILL leader {old}: pid {new} leads and refreshed after {seconds:.1f} s (retry {RETRY:.0f} s)")
    assert seconds < RETRY + 4, seconds
    survivors = set(trio.procs) - {old}
    assert all(httpx.get(f"{trio.bases[pid]}/readyz", timeout=5).status_code == 200 for pid in survivors)
    assert trio.leader() in survivors and trio.most_leaders_seen == 1
    print(f"leaders in order: {trio.leaders_seen}; most holders seen in any sample: {trio.most_leaders_seen}")
