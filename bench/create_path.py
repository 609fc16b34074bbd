"""Create-task throughput: the full stack vs a bare endpoint vs pgbench, on one embedded cluster.

Also home of the benchmark's PostgreSQL (BenchCluster): an embedded cluster from pgserver's
binaries in a temporary directory, a template database migrated once, one database per part.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
from psycopg import sql

from app.identity import system_jwt
from app.identity.principal import Principal
from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate
from bench.load import build_request, summarize

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# Durability off: this measures CPU and locking, not the disk of whatever machine runs it.
PG_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "512MB",
}
POOL_MIN, POOL_MAX = 2, 20  # the API's defaults (DLW_DB_POOL_MIN_SIZE / DLW_DB_POOL_MAX_SIZE)
JWT_SECRET = secrets.token_urlsafe(48)
UNUSED_ISSUER = "http://127.0.0.1:9/no-provider"  # required outside dev mode; never contacted here
TASK_BODY = {
    "repo_id": "bench-org/bench-model",
    "revision": "main",
    "files": [{"path": "model.safetensors", "size": 1048576}],
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------
# The benchmark's PostgreSQL
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchCluster:
    cluster: LocalCluster
    app_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    template: str = "dlw_bench_template"

    def superuser_url(self, dbname: str = "postgres") -> str:
        return self.cluster.url(dbname)

    def app_url(self, dbname: str) -> str:
        return self.cluster.url(dbname, "dlw_app", self.app_password)

    def execute(self, statement: sql.Composable | str, dbname: str = "postgres") -> None:
        with psycopg.connect(self.superuser_url(dbname), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def prepare_template(self) -> None:
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate(self.superuser_url(self.template))
        self.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(self.app_password)))

    def new_database(self, name: str) -> str:
        self.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self.template))
        )
        self.execute("SELECT dlw.secure_database()", name)  # database-level grants are not cloned
        return name

    def server_version(self) -> str:
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def postmaster_pid(self) -> int:
        return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])


@contextmanager
def bench_cluster() -> Iterator[BenchCluster]:
    with tempfile.TemporaryDirectory(prefix="dlw-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "pgdata", port=free_port(), extra_settings=PG_SETTINGS)
        cluster.start()
        try:
            bench = BenchCluster(cluster)
            bench.prepare_template()
            yield bench
        finally:
            cluster.destroy()


# ------------------------------------------------------------------------------------------
# CPU accounting from /proc (clock ticks: 10 ms resolution, fine over seconds)
# ------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on (state is [0])


def process_cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_s(postmaster: int) -> float:
    """CPU of the postmaster, its live children and its reaped children (exited backends)."""
    fields = _stat(postmaster)
    total = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for pid in _children(postmaster):
        try:
            child = _stat(pid)
        except OSError:
            continue
        total += int(child[11]) + int(child[12])
    return total / CLK_TCK


def _children(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == parent:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


class BackendSampler(threading.Thread):
    """CPU of the dlw_app backends (the connections serving the benchmark's requests), sampled
    every 50 ms so that backends which exit during the cell (pgbench's) still count."""

    def __init__(self, postmaster: int) -> None:
        super().__init__(daemon=True)
        self.postmaster = postmaster
        self.stopping = threading.Event()
        self.baseline: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.is_backend: dict[int, bool] = {}
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        for pid in _children(self.postmaster):
            try:
                if pid not in self.is_backend:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                    self.is_backend[pid] = b"dlw_app" in title
                if not self.is_backend[pid]:
                    continue
                fields = _stat(pid)
            except OSError:
                continue
            ticks = int(fields[11]) + int(fields[12])
            if initial:
                self.baseline[pid] = ticks
            self.last[pid] = ticks

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self._sample()

    def finish(self) -> float:
        self.stopping.set()
        self.join()
        self._sample()
        return sum(t - self.baseline.get(pid, 0) for pid, t in self.last.items()) / CLK_TCK


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class QuietWaiter:
    """Before a cell, wait (within a budget for the whole run) until the machine is nearly idle:
    other work on a shared 2-core machine, or autovacuum catching up after the previous cell,
    would otherwise be measured as part of the next cell."""

    def __init__(self, budget_s: float, threshold: float = 0.25, max_per_cell_s: float = 5.0) -> None:
        self.budget_s, self.threshold, self.max_per_cell_s = budget_s, threshold, max_per_cell_s
        self.waited_s = 0.0

    def wait(self) -> None:
        start = time.monotonic()
        while True:
            b0 = machine_busy()
            time.sleep(0.25)
            b1 = machine_busy()
            busy = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
            elapsed = time.monotonic() - start
            if busy < self.threshold or elapsed >= self.max_per_cell_s or self.waited_s + elapsed >= self.budget_s:
                break
        self.waited_s += time.monotonic() - start


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------


def _wait_http(proc: subprocess.Popen[bytes], url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not answer {url}")


@contextmanager
def server(
    argv: list[str], env: dict[str, str], ready_path: str, log: IO[bytes] | None = None
) -> Iterator[tuple[int, int]]:
    """A server subprocess on a free port; yields (port, pid). Its log goes to `log` (for a part
    that reads it) or a temp file."""
    port = free_port()
    with ExitStack() as stack:
        if log is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            [sys.executable, *argv, "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            try:
                _wait_http(proc, f"http://127.0.0.1:{port}{ready_path}")
            except RuntimeError as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}\n{log.read().decode(errors='replace')[-3000:]}") from None
            yield port, proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DLW_", "BENCH_"))}


def full_stack_env(app_url: str) -> dict[str, str]:
    return {
        **base_env(),
        "DLW_DATABASE_URL": app_url,
        "DLW_SYSTEM_JWT_SECRET": JWT_SECRET,
        "DLW_OIDC_ISSUER": UNUSED_ISSUER,
        "DLW_SECRET_KEY": secrets.token_urlsafe(48),
        "DLW_HF_ENDPOINT": "",  # measured: admission, not a hub (bench tasks carry their files)
        "DLW_DB_POOL_MIN_SIZE": str(POOL_MIN),
        "DLW_DB_POOL_MAX_SIZE": str(POOL_MAX),
    }


def bare_env(app_url: str) -> dict[str, str]:
    return {
        **base_env(),
        "BENCH_DATABASE_URL": app_url,
        "BENCH_POOL_MIN_SIZE": str(POOL_MIN),
        "BENCH_POOL_MAX_SIZE": str(POOL_MAX),
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
