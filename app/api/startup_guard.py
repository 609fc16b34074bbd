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
    if not settings.oidc_issuer:
        problems.append("DLW_OIDC_ISSUER is not set (outside dev mode logins need an identity provider)")
    if any(rule.is_wildcard for rule in rules):
        problems.append("DLW_AUTH_TENANT_RULES_JSON has a wildcard email_domain rule (anyone could join a tenant)")
    if settings.system_admin_token is not None and len(settings.system_admin_token.encode()) < MIN_SECRET_BYTES:
        problems.append(f"DLW_SYSTEM_ADMIN_TOKEN is shorter than {MIN_SECRET_BYTES} bytes")
    if not settings.secret_key or len(settings.secret_key.encode()) < MIN_SECRET_BYTES:
        problems.append(f"DLW_SECRET_KEY is not set or shorter than {MIN_SECRET_BYTES} bytes (it encrypts hub tokens)")
    if settings.oidc_client_id and not (settings.oidc_client_secret and settings.oidc_redirect_url):
        problems.append("DLW_OIDC_CLIENT_SECRET and DLW_OIDC_REDIRECT_URL must be set with DLW_OIDC_CLIENT_ID")
    return problems
