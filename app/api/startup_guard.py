"""Fail-closed startup: outside dev mode, refuse insecure settings with one line each that
names the setting to fix."""

from __future__ import annotations

from app.config import DEFAULT_JWT_SECRET, Settings
from app.identity.tenant_rules import RulesError, parse_rules

MIN_SECRET_BYTES = 32


def configuration_problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    try:
        rules = parse_rules(settings.auth_tenant_rules_json)
    except RulesError as exc:
        return [f"DLW_AUTH_TENANT_RULES_JSON is invalid: {exc}"]
    if settings.auth_dev_mode:
        return problems
    secret = settings.system_jwt_secret
    if secret == DEFAULT_JWT_SECRET or len(secret.encode()) < MIN_SECRET_BYTES:
        problems.append(f"DLW_SYSTEM_JWT_SECRET is the default or shorter than {MIN_SECRET_BYTES} bytes")
    problems.extend(_auth_mode_problems(settings, bool(rules)))
    if any(rule.is_wildcard for rule in rules):
        problems.append("DLW_AUTH_TENANT_RULES_JSON has a wildcard email_domain rule (anyone could join a tenant)")
    if settings.system_admin_token is not None and len(settings.system_admin_token.encode()) < MIN_SECRET_BYTES:
        problems.append(f"DLW_SYSTEM_ADMIN_TOKEN is shorter than {MIN_SECRET_BYTES} bytes")
    if settings.metrics_access == "token" and not settings.system_admin_token:
        problems.append("DLW_METRICS_ACCESS=token needs DLW_SYSTEM_ADMIN_TOKEN (the only credential /metrics accepts)")
    if settings.metrics_access == "port" and not _valid_bind(settings.metrics_bind):
        problems.append(f"DLW_METRICS_BIND must be HOST:PORT, not {settings.metrics_bind!r}")
    if not settings.secret_key or len(settings.secret_key.encode()) < MIN_SECRET_BYTES:
        problems.append(f"DLW_SECRET_KEY is not set or shorter than {MIN_SECRET_BYTES} bytes (it encrypts hub tokens)")
    if settings.oidc_client_id and not (settings.oidc_client_secret and settings.oidc_redirect_url):
        problems.append("DLW_OIDC_CLIENT_SECRET and DLW_OIDC_REDIRECT_URL must be set with DLW_OIDC_CLIENT_ID")
    return problems


OIDC_SETTINGS = ("oidc_issuer", "oidc_client_id", "oidc_client_secret", "oidc_redirect_url", "oidc_audience")


def _auth_mode_problems(settings: Settings, has_rules: bool) -> list[str]:
    """DLW_AUTH_MODE=oidc needs an issuer; tokens means no identity provider at all, so a stray
    DLW_OIDC_* setting (half a configuration) is refused rather than silently ignored."""
    if settings.auth_mode == "oidc":
        if settings.oidc_issuer:
            return []
        return [
            "DLW_OIDC_ISSUER is not set (outside dev mode logins need an identity provider;"
            " a deployment of machine tokens only sets DLW_AUTH_MODE=tokens)"
        ]
    stray = [f"DLW_{name.upper()}" for name in OIDC_SETTINGS if getattr(settings, name)]
    problems = [f"DLW_AUTH_MODE=tokens has no identity provider: unset {', '.join(stray)}"] if stray else []
    if has_rules:
        problems.append("DLW_AUTH_MODE=tokens has no logins to place: DLW_AUTH_TENANT_RULES_JSON must be []")
    return problems


def _valid_bind(bind: str) -> bool:
    host, _, port = bind.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
