"""Who is calling: the one identity every authenticated request resolves to."""

from __future__ import annotations

from dataclasses import dataclass

from app.domain import ROLES, TENANT_ROLES

__all__ = ["ROLES", "TENANT_ROLES", "Principal"]


@dataclass(frozen=True)
class Principal:
    user_id: str
    tenant_id: int
    role: str
    # Projects the principal is limited to; empty means every project of the tenant
    # (project-scoped permissions are not part of the model yet).
    project_ids: tuple[str, ...] = ()
    is_service: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "tenant_id": self.tenant_id,
            "role": self.role,
            "project_ids": list(self.project_ids),
            "is_service": self.is_service,
        }
