"""Request throughput under a flood of foreign grant notifications (issue 11, item 9).

Any login may `NOTIFY dlw_casbin_rule`. The API coalesces wake-ups and reloads its policy only
when dlw.grant_version moved (app/authz/authorizer.py), so a flood should cost it little: the
target is flooded req/s >= 0.9 x normal req/s. One `python -m app serve` on a database with
3,000 grant rows (a reload costs what it would in production); a tenant's reporting login in
psql is the flooder. Each round measures normal and flooded throughput side by side, in
alternating order, so load on the shared machine that drifts between rounds cancels out in the
round's ratio; the median round counts. The suite's test (tests/api/test_grant_notifications.py)
proves the mechanism (zero reloads per foreign message); this part measures the 10 % figure.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from app.authz.authorizer import CHANNEL
from app.identity import system_jwt
from app.identity.principal import Principal
from bench.cluster import ROOT, BenchCluster
from bench.cpu_accounting import QuietWaiter, process_cpu_s
from bench.load import build_request
from bench.servers import JWT_SECRET, base_env, full_stack_env, server

GRANTS = 3000
# One flood statement sends BURST notifications with distinct payloads (PostgreSQL folds identical
# ones within a transaction), then sleeps PAUSE: about 1,000 a second, nominally. Faster than that
# on two cores mostly measures the CPU the flooder's psql and backend take from the API.
BURST = 100
PAUSE_S = 0.1
TARGET = 0.9
FLOOD_LEAD_S = 0.5
RELOAD_LINE = b"authorization policy loaded"
# Routes measured: an authenticated route without a database round trip (all the API's time is
# the event loop the listener shares) and the tenant's task list (RLS, one transaction).
ROUTES = {"me": "/api/v1/auth/me", "list": "/api/v1/tasks?limit=20"}


@dataclass
class Round:
    route: str
    number: int
    normal_rps: float
    flooded_rps: float
    normal_cpu_us: float  # API process CPU per request
    flooded_cpu_us: float
    sent: int  # notifications the flooder sent during its flooded window
    flood_s: float

    @property
    def ratio(self) -> float:
        return self.flooded_rps / self.normal_rps if self.normal_rps else 0.0

    @property
    def cpu_ratio(self) -> float:
        """normal / flooded API CPU per request: the req/s ratio if the API's CPU were the only limit."""
        return self.normal_cpu_us / self.flooded_cpu_us if self.flooded_cpu_us else 0.0


def provision(bench: BenchCluster, dbname: str) -> tuple[int, str, str]:
    """A tenant with a reporting login (the flooder), and GRANTS grant rows; (tenant, login, password)."""
    login, password = f"rep_flood_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        row = conn.execute("SELECT dlw.provision_tenant('bench-notify', 'bench notify tenant', 0, 0, 0)").fetchone()
        assert row is not None
        conn.execute("SELECT dlw_admin.create_reporting_login(%s, 'bench-notify', %s)", (login, password))
        conn.execute(
            "INSERT INTO dlw.casbin_rule (ptype, v0, v1)"
            " SELECT 'g', 'user:bulk-' || g, 'tenant_viewer' FROM generate_series(1, %s) g",
            (GRANTS,),
        )
    return int(row[0]), login, password


def drop_login(bench: BenchCluster, dbname: str, login: str) -> None:
    """Reporting logins are cluster-wide roles: dropped with the part, not with the database."""
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        conn.execute("SELECT dlw_admin.drop_reporting_login(%s)", (login,))


@contextmanager
def flood(url: str, bindir: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """psql as the reporting login, bursts of pg_notify for at most `seconds`; stopped on exit."""
    statement = (
        f"SELECT count(pg_notify('{CHANNEL}', 'flood-' || g)) FROM generate_series(1, {BURST}) g;"
        f" SELECT pg_sleep({PAUSE_S});\n"
    )
    env = {k: v for k, v in base_env().items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        [str(bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(statement * max(1, round(seconds / PAUSE_S)))
    proc.stdin.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


def sent_notifications(proc: subprocess.Popen[str]) -> int:
    """Bursts the flooder completed (psql prints each burst's count), times BURST; waits for its end."""
    assert proc.stdout is not None
    return sum(BURST for line in proc.stdout.read().splitlines() if line.strip() == str(BURST))


def measure(port: int, pid: int, request: str, concurrency: int, warmup: float, duration: float) -> tuple[float, float]:
    """(req/s, API CPU µs per request) of one window by bench/load.py (its own process), every
    response a 200. CPU is the API process's over the whole run (warmup included), per response."""
    spec = {
        "host": "127.0.0.1", "port": port, "requests": [request], "expect": 200,
        "concurrency": concurrency, "warmup": warmup, "duration": duration,
    }  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        cpu0 = process_cpu_s(pid)
        out = subprocess.run(
            [sys.executable, "-m", "bench.load", f.name], cwd=ROOT, capture_output=True, text=True, check=False
        )
        cpu = process_cpu_s(pid) - cpu0
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} requests did not answer 200: {result['unexpected']}")
    return float(result["rps"]), 1e6 * cpu / max(1, int(result["completed"]))


def reloads(log: IO[bytes]) -> int:
    log.seek(0)
    return log.read().count(RELOAD_LINE)


def run(
    bench: BenchCluster,
    *,
    rounds: int = 7,
    warmup: float = 0.3,
    duration: float = 2.0,
    concurrency: int = 4,
    quiet_budget_s: float = 60.0,
) -> dict[str, Any]:
    dbname = bench.new_database("dlw_bench_notify")
    tenant_id, login, password = provision(bench, dbname)
    flooder_url = bench.cluster.url(dbname, login, password)
    viewer = Principal(user_id="bench-viewer", tenant_id=tenant_id, role="tenant_viewer")
    token = system_jwt.issue(JWT_SECRET, viewer, 7200)
    quiet = QuietWaiter(budget_s=quiet_budget_s)
    results: list[Round] = []
    try:
        with tempfile.TemporaryFile() as log:
            with server(["-m", "app", "serve"], full_stack_env(bench.app_url(dbname)), "/readyz", log=log) as (
                port,
                pid,
            ):
                requests = {
                    name: build_request("127.0.0.1", port, "GET", path, {"Authorization": f"Bearer {token}"}, b"")
                    for name, path in ROUTES.items()
                }
                deadline = time.monotonic() + 10
                while reloads(log) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)  # the first load, and the one after the listener connected
                before = reloads(log)
                if before < 1:
                    raise RuntimeError("the API logged no policy load: reloads cannot be counted from its log")
                for route, request in requests.items():
                    for number in range(rounds):
                        rps: dict[bool, tuple[float, float]] = {}
                        sent, flood_s = 0, 0.0
                        for flooding in (False, True) if number % 2 == 0 else (True, False):
                            quiet.wait()
                            if not flooding:
                                rps[False] = measure(port, pid, request, concurrency, warmup, duration)
                                continue
                            # The flood runs its course (psql's buffered output survives only a
                            # normal exit); it outlasts the window a little, bursts taking time.
                            started = time.monotonic()
                            with flood(flooder_url, bench.cluster.bindir, FLOOD_LEAD_S + warmup + duration) as proc:
                                time.sleep(FLOOD_LEAD_S)  # the flood is under way before the window opens
                                rps[True] = measure(port, pid, request, concurrency, warmup, duration)
                                sent = sent_notifications(proc)
                                proc.wait(timeout=30)
                                flood_s = time.monotonic() - started
                                if proc.returncode != 0:
                                    assert proc.stderr is not None
                                    raise RuntimeError(f"the flood failed: {proc.stderr.read()[-2000:]}")
                            time.sleep(0.3)  # the last notifications drain before the next window
                        (normal, normal_cpu), (flooded, flooded_cpu) = rps[False], rps[True]
                        r = Round(route, number + 1, normal, flooded, normal_cpu, flooded_cpu, sent, flood_s)
                        results.append(r)
                        print(
                            f"  notify {route:4} round {r.number}: normal {r.normal_rps:7.0f} req/s,"
                            f" flooded {r.flooded_rps:7.0f} req/s, ratio {r.ratio:5.2f}; API CPU/request"
                            f" {r.normal_cpu_us:5.0f} / {r.flooded_cpu_us:5.0f} µs"
                            f"  ({r.sent / r.flood_s:,.0f} notifications/s sent)",
                            flush=True,
                        )
                extra_reloads = reloads(log) - before
    finally:
        drop_login(bench, dbname, login)
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        queue = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
    return {
        "rounds": results,
        "extra_reloads": extra_reloads,
        "queue_usage": float(queue[0]) if queue else float("nan"),
        "concurrency": concurrency,
        "waited_s": quiet.waited_s,
    }


def median_ratio(rounds: list[Round], route: str, *, cpu: bool = False) -> float:
    return statistics.median(r.cpu_ratio if cpu else r.ratio for r in rounds if r.route == route)
