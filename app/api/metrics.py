"""Prometheus metrics of the API (DLW_METRICS_ACCESS; docs/observability.md, "Metrics").

Three sources: counters and histograms the request path updates (requests by route template,
method and status; task admissions by outcome and metric), gauges read from the process at scrape
time (pool usage, snapshot leadership), and gauges read from the database by one cheap query
(dlw.platform_metrics(), sql/95_platform_metrics.sql), cached for DLW_METRICS_CACHE_SECONDS so
that however often anyone scrapes, the database runs it at most that often.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.api.errors import unauthenticated
from app.config import Settings
from app.db.queries import SQL

log = logging.getLogger("dlw.metrics")

UNMATCHED = "unmatched"  # the route label of every request no route matched (bounded, unlike raw paths)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUERY_TIMEOUT_S = 5.0


class DatabaseGauges(Collector):
    """The SQL-backed and process gauges, collected from the last refresh."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.rows: list[asyncpg.Record] = []
        self.refreshed = 0.0  # monotonic time of the last successful refresh
        self.failures = 0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Re-read the database unless the last read is younger than DLW_METRICS_CACHE_SECONDS."""
        async with self._lock:  # concurrent scrapes share one query
            if self.refreshed and time.monotonic() - self.refreshed < self.settings.metrics_cache_seconds:
                return
            pool = getattr(self.app.state, "pool", None)
            if pool is None:
                return
            try:
                self.rows = await pool.fetch(
                    SQL["platform_metrics"],
                    self.settings.metrics_tenant_labels,
                    timeout=QUERY_TIMEOUT_S,
                )
                self.refreshed = time.monotonic()
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                self.failures += 1  # the last values stay; dlw_metrics_refresh_failures_total tells
                log.warning("metrics: the database query failed: %s", exc)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing to check at registration; the families are built per collect

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "dlw_queue_files", "Unfinished files by state (tenant label only when allowed)", labels=["state", "tenant"]
        )
        leases = GaugeMetricFamily(
            "dlw_leases", "Files under lease: live, or expired awaiting the sweep", labels=["state"]
        )
        expiries = CounterMetricFamily("dlw_lease_expiries", "Leases found expired by the sweep (cumulative)")
        age = GaugeMetricFamily(
            "dlw_snapshot_age_seconds", "Seconds since the usage snapshots were last refreshed", labels=["runner"]
        )
        for row in self.rows:
            metric, value = row["metric"], row["value"]
            if metric == "queue_files":
                queue.add_metric([row["state"], row["tenant"] or ""], value)
            elif metric == "leases":
                leases.add_metric([row["state"]], value)
            elif metric == "lease_expiries":
                expiries.add_metric([], value)
            elif metric == "snapshot_age_seconds" and value is not None:
                age.add_metric([row["state"]], value)
        yield from (queue, leases, expiries, age)
        runner = getattr(self.app.state, "snapshot_runner", None)
        leader = GaugeMetricFamily("dlw_snapshot_leader", "1 when this instance runs the usage snapshots' leader loop")
        leader.add_metric([], 1.0 if runner is not None and runner.is_leader else 0.0)
        yield leader
        pool = getattr(self.app.state, "pool", None)
        if pool is not None:
            conns = GaugeMetricFamily("dlw_db_pool_connections", "The API's database pool", labels=["state"])
            conns.add_metric(["in_use"], float(pool.get_size() - pool.get_idle_size()))
            conns.add_metric(["idle"], float(pool.get_idle_size()))
            conns.add_metric(["max"], float(pool.get_max_size()))
            yield conns
        failures = CounterMetricFamily(
            "dlw_metrics_refresh_failures", "Failed reads of dlw.platform_metrics() (the gauges keep their last values)"
        )
        failures.add_metric([], float(self.failures))
        yield failures


class ApiMetrics:
    """One registry per application (several apps in one test process must not share counters)."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "dlw_http_requests", "HTTP requests by route template, method and status", ["route", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "dlw_http_request_duration_seconds", "HTTP request latency by route template and method",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.admissions = Counter(
            "dlw_admissions", "Task creations by outcome, and the quota metric of a refusal", ["outcome", "metric"],
            registry=self.registry,
        )  # fmt: skip
        self.gauges = DatabaseGauges(app, settings)
        self.registry.register(self.gauges)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    async def exposition(self) -> bytes:
        await self.gauges.refresh()
        return generate_latest(self.registry)


def metrics_of(app: Any) -> ApiMetrics | None:
    found: ApiMetrics | None = getattr(app.state, "metrics", None)
    return found


def count_admission(request: Request, outcome: str, metric: str | None) -> None:
    """Count one task creation's outcome (app/api/routes/tasks.py), by the SQL's own outcome names."""
    metrics = metrics_of(request.app)
    if metrics is not None:
        metrics.admissions.labels(outcome, metric or "").inc()


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics with DLW_METRICS_ACCESS=token: the system_admin token only."""
    settings: Settings = request.app.state.settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.system_admin_token or ""
    if not (expected and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())):
        raise unauthenticated()  # /metrics answers the system_admin token (DLW_SYSTEM_ADMIN_TOKEN) only
    metrics = metrics_of(request.app)
    assert metrics is not None
    return Response(await metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not access-log news
        pass


class MetricsListener:
    """DLW_METRICS_ACCESS=port: /metrics on a listener of its own (a thread), so the API port
    never serves it; the scrape hands the refresh to the API's event loop."""

    def __init__(self, metrics: ApiMetrics, bind: str, loop: asyncio.AbstractEventLoop) -> None:
        host, _, port = bind.rpartition(":")
        self.metrics, self.loop = metrics, loop
        self.server: WSGIServer = make_server(
            host.strip("[]") or "127.0.0.1", int(port), self._wsgi, handler_class=_QuietHandler
        )
        self.thread = threading.Thread(target=self.server.serve_forever, name="dlw-metrics", daemon=True)

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        future = asyncio.run_coroutine_threadsafe(self.metrics.exposition(), self.loop)
        body = future.result(timeout=QUERY_TIMEOUT_S + 5)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def install(app: FastAPI, settings: Settings) -> None:
    """Metrics are always counted (cheap); exposed only as DLW_METRICS_ACCESS says."""
    app.state.metrics = ApiMetrics(app, settings)
    if settings.metrics_access == "token":
        app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
