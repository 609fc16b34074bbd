"""The FastAPI application: thin routes over SQL, one tenant-scoped transaction per request."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI

from app.api import api_docs, error_handlers, health, metrics, openapi_document
from app.api.body_limit import BodySizeLimit
from app.api.lifespan import StartupRefused, lifespan_for
from app.api.request_context import RequestContext
from app.api.routes import (
    administration,
    auth,
    executor,
    executor_batch,
    executor_deletions,
    hub_token,
    quota,
    storage_targets,
    tasks,
)
from app.api.startup_guard import configuration_problems
from app.config import DEFAULT_JWT_SECRET, Settings, get_settings
from app.identity.oidc import OidcClient
from app.identity.tenant_rules import parse_rules

log = logging.getLogger("dlw")

# FastAPI matches routes in order: the busiest routers first.
ROUTERS = (
    tasks.router,
    quota.router,
    storage_targets.router,
    hub_token.router,
    auth.router,
    administration.router,
    executor.router,
    executor_batch.router,
    executor_deletions.router,
    health.router,
)

__all__ = ["StartupRefused", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    problems = configuration_problems(settings)
    if problems:
        raise StartupRefused("; ".join(problems))
    if settings.auth_dev_mode and settings.system_jwt_secret == DEFAULT_JWT_SECRET:
        # Never sign with a publicly known secret, even in dev mode: use one for this process.
        log.warning("dev mode: DLW_SYSTEM_JWT_SECRET unset; tokens are signed with a random per-process secret")
        settings = settings.model_copy(update={"system_jwt_secret": secrets.token_urlsafe(48)})

    # No trailing-slash redirects: Starlette builds their Location from the request's Host
    # header, so anyone could make the API point a client at another host. A path with a
    # stray slash is answered 404 ROUTE_NOT_FOUND instead (app/api/error_handlers.py).
    # The docs pages are added by app/api/api_docs.py (offline assets, DLW_API_DOCS).
    app = FastAPI(
        title="DLW",
        version="0.1.0",
        lifespan=lifespan_for(settings),
        redirect_slashes=False,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=openapi_document.operation_id,
    )
    app.state.settings = settings
    app.state.tenant_rules = parse_rules(settings.auth_tenant_rules_json)
    app.state.oidc = _oidc_client(settings)
    app.state.expected_schema = health.expected_schema()
    for router in ROUTERS:
        app.include_router(router)
    openapi_document.install(app)  # the completed document (error answers, security, headers)
    api_docs.install(app, settings)
    metrics.install(app, settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.http_max_body_bytes)
    app.add_middleware(RequestContext)  # outermost of ours: sees every answer, even a 413
    error_handlers.install(app)
    return app


def _oidc_client(settings: Settings) -> OidcClient | None:
    if not settings.oidc_issuer:
        return None
    return OidcClient(
        issuer=settings.oidc_issuer,
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        redirect_url=settings.oidc_redirect_url,
        audience=settings.oidc_audience,
    )
