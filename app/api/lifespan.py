"""What the API holds while it runs: the pool, the authorizer (whose listening connection also
wakes long-poll claims) and the snapshot runner (the last two on the session connection,
DLW_DIRECT_DATABASE_URL: app/db/connect.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from app.api.metrics import MetricsListener
from app.api.queue_wakeup import CHANNEL as WAKEUP_CHANNEL
from app.api.queue_wakeup import QueueWakeup
from app.api.snapshot_leader import SnapshotRunner
from app.authz.authorizer import Authorizer
from app.config import Settings
from app.db.connect import PoolerMisconfigured, resolve_endpoints, role_problems
from app.db.pool import create_pool

log = logging.getLogger("dlw")


class StartupRefused(RuntimeError):
    """The configuration is unsafe; the message names the setting to fix."""


def lifespan_for(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            endpoints = await resolve_endpoints(settings)
        except PoolerMisconfigured as exc:
            raise StartupRefused(str(exc)) from None
        pool = await create_pool(
            endpoints.url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            **endpoints.pool_options(),
        )
        try:
            problems = await role_problems(endpoints)
            if problems and not settings.auth_dev_mode:
                raise StartupRefused(problems[0])
            for problem in problems:
                log.warning("dev mode: %s", problem)
            app.state.pool = pool
            app.state.queue_wakeup = QueueWakeup()  # long-poll claims (app/api/queue_wakeup.py)
            app.state.authz = Authorizer(pool, also={WAKEUP_CHANNEL: app.state.queue_wakeup.notified})
            # LISTEN and the leader's advisory lock need a session: the direct URL.
            await app.state.authz.start(endpoints.direct_url)
            # Usage snapshots: nothing to run under pg_cron, else compete for leadership.
            app.state.snapshot_runner = SnapshotRunner(
                endpoints.direct_url,
                interval=settings.snapshot_interval_seconds,
                retry=settings.snapshot_leader_retry_seconds,
            )
            listener = None
            if settings.metrics_access == "port":  # a listener of its own (app/api/metrics.py)
                try:
                    listener = MetricsListener(app.state.metrics, settings.metrics_bind, asyncio.get_running_loop())
                except OSError as exc:
                    raise StartupRefused(f"DLW_METRICS_BIND {settings.metrics_bind}: {exc.strerror or exc}") from None
                listener.start()
                log.info("metrics on http://%s/metrics", settings.metrics_bind)
            try:
                await app.state.snapshot_runner.start(pool)
                yield
            finally:
                if listener is not None:
                    listener.stop()
                await app.state.snapshot_runner.stop()
                await app.state.authz.stop()
                await app.state.queue_wakeup.close()
        finally:
            await pool.close()

    return lifespan
