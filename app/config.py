"""Settings, read from the environment with the prefix DLW_ (see docs/operator.md)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.domain import DEFAULT_MAX_ATTEMPTS

DEFAULT_JWT_SECRET = "change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLW_", extra="ignore")

    # Runtime connection of the API, as dlw_app (never a superuser or BYPASSRLS role).
    database_url: str | None = None
    # A session connection (PostgreSQL itself, or a session-mode pool) for what needs one: LISTEN
    # and the snapshot leader's lock. Unset: DLW_DATABASE_URL (refused behind a transaction pooler).
    direct_database_url: str | None = None
    # Whether DLW_DATABASE_URL is a transaction pooler (PgBouncer pool_mode=transaction): then no
    # named prepared statements are used on it. auto: detected at startup (app/db/connect.py).
    database_pooler: Literal["auto", "none", "transaction"] = "auto"
    # Connection used by `dlw migrate` / `dlw doctor`: the schema owner or a superuser.
    migration_database_url: str | None = None
    # Where `dlw dev` keeps its embedded PostgreSQL (relative to the working directory).
    data_dir: str = ".dlw"

    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=20, ge=1)
    # Seconds a request waits for a pooled connection before answering 503 DB_UNAVAILABLE.
    db_acquire_timeout_seconds: float = Field(default=10.0, gt=0)
    # Milliseconds a task creation waits for its tenant's quota lock before answering 503.
    quota_lock_timeout_ms: int = Field(default=2000, ge=1)

    system_jwt_secret: str = DEFAULT_JWT_SECRET
    system_jwt_ttl_seconds: int = Field(default=3600, ge=60)
    system_admin_token: str | None = None
    auth_dev_mode: bool = False
    # How people authenticate outside dev mode: oidc (an identity provider, DLW_OIDC_*) or tokens
    # (no identity provider: machines only, with tokens from `dlw token issue` and the
    # system_admin token; every DLW_OIDC_* setting and login rule must then be unset).
    auth_mode: Literal["oidc", "tokens"] = "oidc"
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_redirect_url: str | None = None
    oidc_audience: str | None = None
    auth_tenant_rules_json: str = "[]"
    # Who may read /openapi.json, /docs and /redoc: anyone, any authenticated caller, or nobody
    # (the routes do not exist). Unset: public in dev mode, authenticated otherwise
    # (app/api/api_docs.py).
    api_docs: Literal["public", "authenticated", "off"] | None = None

    # Executors (API side): claims a file gets before a retryable failure or an expired lease
    # fails it for good.
    executor_max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    # Usage snapshots, when the API runs them (no pg_cron job): seconds between two refreshes
    # by the leader, and between two attempts of the other instances to become leader (a dead
    # leader is replaced within this plus the time the database takes to drop its session).
    snapshot_interval_seconds: float = Field(default=60.0, gt=0)
    snapshot_leader_retry_seconds: float = Field(default=5.0, gt=0, le=10)

    # The HTTP server (`dlw serve`, `dlw dev`; app/api/http_limits.py). Seconds a request may take
    # from its first byte (or a new connection) to its last header before it is answered 408 and
    # closed; the bytes and lines its request line and headers may take (else 431); seconds a
    # keep-alive connection may idle between requests; uvicorn's limit_concurrency (None = off:
    # beyond it uvicorn answers a plain-text 503); the largest request body (else 413).
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    http_max_header_bytes: int = Field(default=65536, ge=4096)
    http_max_headers: int = Field(default=100, ge=10)
    http_keep_alive_seconds: int = Field(default=5, ge=1)
    http_limit_concurrency: int | None = Field(default=None, ge=1)
    http_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    # /metrics (app/api/metrics.py, docs/observability.md "Metrics"): off (the default: no such route),
    # token (on the API's port, for the DLW_SYSTEM_ADMIN_TOKEN only) or port (a listener of its
    # own on DLW_METRICS_BIND, without authentication: the bind address is the restriction).
    metrics_access: Literal["off", "token", "port"] = "off"
    metrics_bind: str = "127.0.0.1:9464"
    # Series labelled with a tenant slug: the N busiest tenants by queue (0 = no tenant label).
    metrics_tenant_labels: int = Field(default=0, ge=0, le=50)
    # The SQL-backed gauges are refreshed at most once per this many seconds, whoever scrapes.
    metrics_cache_seconds: float = Field(default=5.0, gt=0, le=300)

    # The Hugging Face Hub (or a compatible mirror) that task creation asks for a revision's
    # commit and manifest; a bound on all of its answers for one creation (seconds, then 503
    # HUB_UNAVAILABLE), and on each request.
    hf_endpoint: str = "https://huggingface.co"
    hub_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    hub_request_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Encrypts the tenants' hub tokens at rest (app/api/hub_secrets.py); required (>= 32 bytes)
    # outside dev mode. Changing it makes the stored tokens undecryptable: set them again.
    secret_key: str | None = None

    # The reference executor (`dlw executor run`) reads its own DLW_EXECUTOR_* settings:
    # app/executor/settings.py.


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
