"""What the API holds while it runs: the pool, the authorizer and the snapshot runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from app.api.metrics import MetricsListener
from app.api.snapshot_leader import SnapshotRunner
from app.authz.authorizer import Authorizer
from app.config import Settings
from app.db.pool import create_pool, role_safety_problem

log = logging.getLogger("dlw")


class StartupRefused(RuntimeError):
    """The configuration is unsafe; the message names the setting to fix."""


def lifespan_for(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.database_url:
            raise StartupRefused("DLW_DATABASE_URL is not set (the API connects as dlw_app)")
        pool = await create_pool(
            settings.database_url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
        )
        try:
            async with pool.acquire() as conn:
                problem = await role_safety_problem(conn)
            if problem and not settings.auth_dev_mode:
                raise StartupRefused(f"DLW_DATABASE_URL: {problem}")
            if problem:
                log.warning("dev mode: %s", problem)
            app.state.pool = pool
            app.state.authz = Authorizer(pool)
            await app.state.authz.start(settings.database_url)
            # Usage snapshots: nothing to run under pg_cron, else compete for leadership.
            app.state.snapshot_runner = SnapshotRunner(
                settings.database_url,
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
        finally:
            await pool.close()

    return lifespan
