"""Create-task throughput: the full stack vs a bare endpoint vs pgbench, on one embedded cluster
(bench/cluster.py), each cell's CPU accounted from /proc (bench/cpu_accounting.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from app.identity import system_jwt
from app.identity.principal import Principal
from bench.cluster import BENCH_DIR, ROOT, BenchCluster
from bench.cpu_accounting import (
    CLK_TCK,
    BackendSampler,
    QuietWaiter,
    children_cpu_s,
    machine_busy,
    postgres_cpu_s,
    process_cpu_s,
)
from bench.load import build_request, summarize
from bench.servers import JWT_SECRET, bare_env, base_env, full_stack_env, server

TASK_BODY = {
    "repo_id": "bench-org/bench-model",
    "revision": "main",
    "files": [{"path": "model.safetensors", "size": 1048576}],
}


# ------------------------------------------------------------------------------------------
# One measured cell
# ------------------------------------------------------------------------------------------


@dataclass
class Cell:
    system: str  # full | bare | pgbench
    tenancy: str  # many | hot
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    count: int
    server_cpu_us: float | None  # API process CPU per request
    pg_cpu_us: float  # CPU of the dlw_app backends per request
    pg_other_cpu_us: float  # CPU of the rest of PostgreSQL (autovacuum, WAL writer, ...) per request
    client_cpu_us: float  # load generator (or pgbench) CPU per request
    machine_busy: float  # share of all cores busy during the cell
    others_busy: float  # share of all cores used by processes outside the benchmark
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Meter:
    """CPU across one cell: the API process, the dlw_app backends, all of PostgreSQL, the client
    (child processes of this one), the machine, and what other processes on it used."""

    def __init__(self, postmaster: int, server_pid: int | None) -> None:
        self.postmaster, self.server_pid = postmaster, server_pid

    def __enter__(self) -> Meter:
        self.sampler = BackendSampler(self.postmaster)
        self.sampler.start()
        self.server0 = process_cpu_s(self.server_pid) if self.server_pid else 0.0
        self.pg_all0 = postgres_cpu_s(self.postmaster)
        self.client0 = children_cpu_s()
        self.self0 = time.process_time()
        self.busy0 = machine_busy()
        return self

    def __exit__(self, *exc: object) -> None:
        busy1 = machine_busy()
        self.server = (process_cpu_s(self.server_pid) - self.server0) if self.server_pid else None
        self.client = children_cpu_s() - self.client0
        time.sleep(0.2)  # let exiting backends be reaped (their CPU moves to the postmaster's cutime)
        self.backends = self.sampler.finish()
        self.pg_all = postgres_cpu_s(self.postmaster) - self.pg_all0
        own = time.process_time() - self.self0
        busy_s = (busy1[0] - self.busy0[0]) / CLK_TCK
        total_s = max(1e-9, (busy1[1] - self.busy0[1]) / CLK_TCK)
        self.busy = busy_s / total_s
        mine = (self.server or 0.0) + self.pg_all + self.client + own
        self.others = max(0.0, busy_s - mine) / total_s


def http_cell(
    bench: BenchCluster,
    system: str,
    tenancy: str,
    port: int,
    pid: int,
    requests: list[str],
    concurrency: int,
    warmup: float,
    duration: float,
) -> Cell:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "requests": requests,
        "expect": 201,
        "concurrency": concurrency,
        "warmup": warmup,
        "duration": duration,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        with Meter(bench.postmaster_pid(), pid) as meter:
            out = subprocess.run(
                [sys.executable, "-m", "bench.load", f.name], cwd=ROOT, capture_output=True, text=True, check=False
            )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    total = max(1, result["completed"])  # CPU is measured over the whole run, warmup included
    return Cell(
        system=system,
        tenancy=tenancy,
        concurrency=concurrency,
        rps=result["rps"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        errors=result["errors"],
        count=result["count"],
        server_cpu_us=1e6 * meter.server / total if meter.server is not None else None,
        pg_cpu_us=1e6 * meter.backends / total,
        pg_other_cpu_us=1e6 * max(0.0, meter.pg_all - meter.backends) / total,
        client_cpu_us=1e6 * meter.client / total,
        machine_busy=meter.busy,
        others_busy=meter.others,
        note="; ".join(result["unexpected"]),
    )


def pgbench_cell(
    bench: BenchCluster,
    dbname: str,
    tenancy: str,
    tenant_range: tuple[int, int],
    concurrency: int,
    warmup: float,
    duration: float,
) -> Cell:
    pgbench = bench.cluster.bindir / "pgbench"
    with tempfile.TemporaryDirectory(prefix="dlw-pgbench-") as tmp:
        argv = [
            str(pgbench),
            "-n",  # no vacuum of pgbench's own tables
            "-h", str(bench.cluster.socket_dir),
            "-p", str(bench.cluster.port),
            "-U", "dlw_app",
            "-M", "prepared",
            "-c", str(concurrency),
            "-j", str(min(concurrency, os.cpu_count() or 1)),
            "-T", str(math.ceil(warmup + duration)),
            "-f", str(BENCH_DIR / "pgbench_create.sql"),
            "-D", f"tmin={tenant_range[0]}",
            "-D", f"tmax={tenant_range[1]}",
            "-l", f"--log-prefix={tmp}/tx",
            dbname,
        ]  # fmt: skip
        env = {**base_env(), "PGPASSWORD": bench.app_password}
        with Meter(bench.postmaster_pid(), None) as meter:
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
        # Per-transaction log: client tx_no latency_us script epoch_s epoch_us
        done: list[tuple[float, float]] = []
        for log in Path(tmp).glob("tx*"):
            for line in log.read_text().splitlines():
                parts = line.split()
                done.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1e6))
    if not done:
        raise RuntimeError(f"pgbench logged no transaction: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    first_end = min(end for end, _ in done)
    last_end = max(end for end, _ in done)
    start = first_end - min(lat for end, lat in done if end == first_end)
    measure_from = start + warmup
    window = max(1e-9, last_end - measure_from)
    measured = [lat for end, lat in done if end - lat >= measure_from]
    stats = summarize(measured, window)
    errors = 0
    for line in out.stdout.splitlines():
        if line.startswith("number of failed transactions:"):
            errors = int(line.split(":")[1].split()[0])
    total = max(1, len(done))
    return Cell(
        system="pgbench",
        tenancy=tenancy,
        concurrency=concurrency,
        rps=stats["rps"],
        p50_ms=stats["p50_ms"],
        p99_ms=stats["p99_ms"],
        errors=errors,
        count=int(stats["count"]),
        server_cpu_us=None,
        pg_cpu_us=1e6 * meter.backends / total,
        pg_other_cpu_us=1e6 * max(0.0, meter.pg_all - meter.backends) / total,
        client_cpu_us=1e6 * meter.client / total,
        machine_busy=meter.busy,
        others_busy=meter.others,
    )


# ------------------------------------------------------------------------------------------
# The part
# ------------------------------------------------------------------------------------------


def provision(bench: BenchCluster, dbname: str, tenants: int) -> tuple[list[int], int]:
    """`tenants` tenants for the many-tenant cells and one hot tenant, all with unlimited quota and
    rate (0 = unlimited: admission still takes the tenant's quota lock, but counts nothing)."""
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT dlw.provision_tenant(format('bench-t%%s', g), 'bench tenant', 0, 0, 0)"
            " FROM generate_series(1, %s) g ORDER BY g",
            (tenants,),
        ).fetchall()
        hot = conn.execute("SELECT dlw.provision_tenant('bench-hot', 'bench hot tenant', 0, 0, 0)").fetchone()
        conn.execute("UPDATE dlw.tenants SET quota_tasks_per_minute = 0 WHERE slug LIKE 'bench-%'")
    ids = [int(r[0]) for r in rows]
    assert ids == list(range(ids[0], ids[0] + tenants)), "tenant ids must be contiguous for pgbench's random()"
    assert hot is not None
    return ids, int(hot[0])


def full_requests(port: int, tenants: list[int]) -> list[str]:
    body = json.dumps(TASK_BODY).encode()
    out = []
    for tid in tenants:
        token = system_jwt.issue(JWT_SECRET, Principal(user_id="bench", tenant_id=tid, role="tenant_operator"), 7200)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        out.append(build_request("127.0.0.1", port, "POST", "/api/v1/tasks", headers, body))
    return out


def bare_requests(port: int, tenants: list[int]) -> list[str]:
    body = json.dumps(TASK_BODY).encode()
    headers = [{"X-Tenant-Id": str(tid), "Content-Type": "application/json"} for tid in tenants]
    return [build_request("127.0.0.1", port, "POST", "/tasks", h, body) for h in headers]


def run(
    bench: BenchCluster,
    *,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    tenants: int = 200,
    warmup: float = 0.4,
    duration: float = 2.0,
    rounds: int = 2,
    quiet_budget_s: float = 60.0,
    progress: bool = True,
) -> list[Cell]:
    """Every (tenancy, concurrency) runs `rounds` rounds of the three systems, in alternating
    order; each system keeps its best round (highest req/s), so a transient disturbance of the
    shared machine costs one round, not the cell."""
    dbname = bench.new_database("dlw_bench_create")
    many, hot = provision(bench, dbname, tenants)
    app_url = bench.app_url(dbname)
    cells: list[Cell] = []
    quiet = QuietWaiter(budget_s=quiet_budget_s)
    with ExitStack() as stack:
        full_port, full_pid = stack.enter_context(server(["-m", "app", "serve"], full_stack_env(app_url), "/readyz"))
        bare_port, bare_pid = stack.enter_context(server(["-m", "bench.bare_app"], bare_env(app_url), "/healthz"))
        for tenancy, ids in (("many", many), ("hot", [hot])):
            full_reqs, bare_reqs = full_requests(full_port, ids), bare_requests(bare_port, ids)
            for concurrency in concurrencies:
                best: dict[str, Cell] = {}
                for round_no in range(rounds):
                    order = ("full", "bare", "pgbench") if round_no % 2 == 0 else ("pgbench", "bare", "full")
                    for system in order:
                        quiet.wait()
                        if system == "pgbench":
                            cell = pgbench_cell(
                                bench, dbname, tenancy, (ids[0], ids[-1]), concurrency, warmup, duration
                            )
                        else:
                            http = {"full": (full_port, full_pid, full_reqs), "bare": (bare_port, bare_pid, bare_reqs)}
                            port, pid, reqs = http[system]
                            cell = http_cell(bench, system, tenancy, port, pid, reqs, concurrency, warmup, duration)
                        if system not in best or cell.rps > best[system].rps:
                            best[system] = cell
                        if progress:
                            print(
                                f"  create {tenancy:4} c={concurrency:<3} {system:8} round {round_no + 1}"
                                f" {cell.rps:8.0f} req/s  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms"
                                f"  errors {cell.errors}  other load {cell.others_busy:4.0%}"
                                + (f"  ({cell.note[:200]})" if cell.note else ""),
                                flush=True,
                            )
                cells += [best[system] for system in ("full", "bare", "pgbench")]
    if progress:
        print(f"  (waited {quiet.waited_s:.0f} s in all for a quiet machine before the cells)", flush=True)
    return cells
