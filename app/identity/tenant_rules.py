"""Placement of new users: DLW_AUTH_TENANT_RULES_JSON, a list of rules tried in order.

    [{"email_domain": "acme.com", "tenant": "acme", "role": "tenant_operator"},
     {"group": "globex-admins", "tenant": "globex", "role": "tenant_admin"}]

A rule matches on a verified email's domain (exact, case-insensitive) or on membership of a
group claimed by the identity provider. The first match names the tenant slug and role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from app.domain import TENANT_ROLES


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class TenantRule:
    tenant: str
    role: str
    email_domain: str | None = None
    group: str | None = None

    @property
    def is_wildcard(self) -> bool:
        return self.email_domain is not None and ("*" in self.email_domain or self.email_domain in ("", "."))

    def matches(self, email: str | None, email_verified: bool, groups: list[str]) -> bool:
        if self.email_domain is not None:
            if not email or not email_verified or "@" not in email:
                return False
            domain = email.rsplit("@", 1)[1].lower()
            return self.is_wildcard or domain == self.email_domain.lower()
        return self.group is not None and self.group in groups


def parse_rules(text: str) -> list[TenantRule]:
    try:
        raw = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise RulesError(f"not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, list):
        raise RulesError("must be a JSON list of rules")
    rules = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("tenant"), str):
            raise RulesError(f"rule {i}: needs a string 'tenant'")
        role = item.get("role", "tenant_viewer")
        if role not in TENANT_ROLES:
            raise RulesError(f"rule {i}: role must be one of {', '.join(TENANT_ROLES)}")
        keys = {"email_domain", "group"} & item.keys()
        if len(keys) != 1 or not isinstance(item[next(iter(keys))], str):
            raise RulesError(f"rule {i}: needs exactly one of 'email_domain' or 'group' (a string)")
        unknown = item.keys() - {"email_domain", "group", "tenant", "role"}
        if unknown:
            raise RulesError(f"rule {i}: unknown keys {sorted(unknown)}")
        rules.append(
            TenantRule(tenant=item["tenant"], role=role, email_domain=item.get("email_domain"), group=item.get("group"))
        )
    return rules


def first_match(
    rules: list[TenantRule], email: str | None, email_verified: bool, groups: list[str]
) -> TenantRule | None:
    return next((r for r in rules if r.matches(email, email_verified, groups)), None)
