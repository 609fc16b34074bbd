"""The one registry of what the API's SQL answers, and how each answer reaches the client.

Each entry is one SQL call a route makes: a SQL function (by its name, e.g. "dlw.cancel_task")
or a named query of app/db/queries.sql. It lists the call's success outcomes, its refusals
(outcome → status and stable code), its answer when a lookup finds no row, and SQLSTATEs it
answers more specifically than the general table (app/api/sqlstates.py). Routes read results
through `answer_of` / `found`, so an outcome nobody listed fails closed: one error line in the
log and a 500 INTERNAL_ERROR, never a 2xx. The OpenAPI error responses are built from the same
entries (app/api/openapi_errors.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.api.errors import INTERNAL_ERROR, Refusal

log = logging.getLogger("dlw.api")


@dataclass(frozen=True)
class Answers:
    """What one SQL call may answer."""

    success: frozenset[str] = frozenset()
    refusals: Mapping[str, Refusal] = field(default_factory=dict)  # outcome → answer
    missing: Refusal | None = None  # a lookup that found no row
    sqlstates: Mapping[str, Refusal] = field(default_factory=dict)  # SQLSTATE → a more specific answer

    def all(self) -> list[Refusal]:
        return [*self.refusals.values(), *([self.missing] if self.missing else []), *self.sqlstates.values()]


# Refusals the routes answer themselves, before or without SQL.
INVALID_CURSOR = Refusal(422, "INVALID_CURSOR", "the cursor is not one this API issued")
DUPLICATE_FILE_PATH = Refusal(422, "DUPLICATE_FILE_PATH", "two files of the task have the same path")
OIDC_NOT_CONFIGURED_422 = Refusal(422, "OIDC_NOT_CONFIGURED", "no issuer given and DLW_OIDC_ISSUER is unset")
OIDC_NOT_CONFIGURED = Refusal(503, "OIDC_NOT_CONFIGURED", "no identity provider is configured")
OIDC_UPSTREAM = Refusal(503, "OIDC_UPSTREAM", "the identity provider did not answer", retry_after=5)
OIDC_INVALID_CODE = Refusal(400, "OIDC_INVALID_CODE", "the authorization code was refused")
OIDC_STATE_MISMATCH = Refusal(400, "OIDC_STATE_MISMATCH", "the login state does not match this browser")
OIDC_NONCE_MISMATCH = Refusal(400, "OIDC_NONCE_MISMATCH", "the ID token's nonce does not match")
OIDC_PROVIDER_ERROR = Refusal(400, "OIDC_PROVIDER_ERROR", "the identity provider reported an error")

# Task creation by name: what the hub answered (app/api/hub.py), or what the selection left.
REPO_NOT_FOUND = Refusal(
    422, "REPO_NOT_FOUND", "the hub has no such repository (or it is private and the tenant's hub token has no access)"
)
REVISION_NOT_FOUND = Refusal(422, "REVISION_NOT_FOUND", "the repository has no such branch, tag or commit")
HUB_ACCESS_DENIED = Refusal(
    422, "HUB_ACCESS_DENIED", "the repository is gated or private: the tenant's hub token is missing or has no access"
)
HUB_UNAVAILABLE = Refusal(
    503, "HUB_UNAVAILABLE", "the hub did not answer in time, rate-limited us or failed: retry", retry_after=5
)
EMPTY_SELECTION = Refusal(422, "EMPTY_SELECTION", "no file of the revision matches include/exclude")
MANIFEST_MISMATCH = Refusal(
    422, "MANIFEST_MISMATCH", "a listed file is not in the revision on the hub, or its size or sha256 differs"
)
MANIFEST_TOO_LARGE = Refusal(422, "MANIFEST_TOO_LARGE", "the selection has more files than a task may hold")
FILES_OR_PATTERNS = Refusal(
    422, "FILES_OR_PATTERNS", "include/exclude select from the hub's listing: give them or files, not both"
)
FILES_REQUIRED = Refusal(
    422, "FILES_REQUIRED", "this deployment resolves no repository names (DLW_HF_ENDPOINT is empty): give the files"
)
HUB_TOKEN_NOT_SET = Refusal(404, "HUB_TOKEN_NOT_SET", "the tenant has no hub token")
HUB_REFUSALS = (
    REPO_NOT_FOUND,
    REVISION_NOT_FOUND,
    HUB_ACCESS_DENIED,
    HUB_UNAVAILABLE,
    EMPTY_SELECTION,
    MANIFEST_MISMATCH,
    MANIFEST_TOO_LARGE,
    FILES_REQUIRED,
    FILES_OR_PATTERNS,
)

TASK_NOT_FOUND = Refusal(404, "TASK_NOT_FOUND", "no such task in the tenant")
TENANT_NOT_FOUND = Refusal(404, "TENANT_NOT_FOUND", "no such tenant")
TENANT_INACTIVE = Refusal(403, "TENANT_INACTIVE", "the tenant is switched off")
FILE_NOT_FOUND = Refusal(404, "FILE_NOT_FOUND", "no such file in the executor's scope")
LEASE_LOST = Refusal(409, "LEASE_LOST", "the lease is not (or no longer) the caller's: stop working on the file")
EXECUTOR_RETRY = Refusal(503, "EXECUTOR_RETRY", "a deadlock or serialization failure: retry", retry_after=1)
EXECUTOR_SQLSTATES = {"40001": EXECUTOR_RETRY, "40P01": EXECUTOR_RETRY}
LEASE_REFUSALS = {"NOT_FOUND": FILE_NOT_FOUND, "LEASE_LOST": LEASE_LOST}
DELETION_NOT_FOUND = Refusal(404, "DELETION_NOT_FOUND", "no such task deletion in the executor's scope")
DELETION_LEASE_REFUSALS = {"NOT_FOUND": DELETION_NOT_FOUND, "LEASE_LOST": LEASE_LOST}
BAD_CHECKPOINT = Refusal(
    422,
    "BAD_CHECKPOINT",
    "checkpoint_bytes and checkpoint_sha256 come together: 0..the declared size, 64 lowercase hex digits;"
    " nothing changed",
)

QUOTA_EXCEEDED = Refusal(429, "QUOTA_EXCEEDED", "a quota refuses the task", fields=("metric",))
QUOTA_LOCK_TIMEOUT = Refusal(503, "QUOTA_LOCK_TIMEOUT", "the quota row is busy: retry", retry_after=1)

REGISTRY: dict[str, Answers] = {
    # -- tasks (sql/30_tasks.sql) ----------------------------------------------------------
    "dlw.create_task": Answers(
        success=frozenset({"created", "existing"}),
        refusals={
            "IDEMPOTENCY_CONFLICT": Refusal(409, "IDEMPOTENCY_CONFLICT", "the key was used with another request"),
            "UNKNOWN_PROJECT": Refusal(422, "UNKNOWN_PROJECT", "no such project in the tenant"),
            "UNKNOWN_STORAGE_TARGET": Refusal(422, "UNKNOWN_STORAGE_TARGET", "no such storage target in the tenant"),
            "TENANT_INACTIVE": TENANT_INACTIVE,
            "QUOTA_EXCEEDED": QUOTA_EXCEEDED,
        },
        sqlstates={
            "55P03": QUOTA_LOCK_TIMEOUT,
            # the trigger tasks_storage_layout (sql/22_storage_target_triggers.sql)
            "DLW25": Refusal(
                422, "HF_CACHE_NEEDS_COMMIT", "an hf-cache storage target needs the task's resolved commit"
            ),
        },
    ),
    "task_by_id": Answers(missing=TASK_NOT_FOUND),
    "dlw.cancel_task": Answers(
        success=frozenset({"cancelled"}),
        refusals={
            "NOT_FOUND": TASK_NOT_FOUND,
            "TASK_TERMINAL": Refusal(409, "TASK_TERMINAL", "the task has already finished"),
        },
    ),
    "dlw.retry_task": Answers(
        success=frozenset({"retried"}),
        refusals={
            "NOT_FOUND": TASK_NOT_FOUND,
            "TASK_NOT_FAILED": Refusal(409, "TASK_NOT_FAILED", "only a failed task can be retried"),
            "TASK_DELETED": Refusal(409, "TASK_DELETED", "the task's files are being deleted or were deleted"),
            "TENANT_INACTIVE": TENANT_INACTIVE,
            "QUOTA_EXCEEDED": QUOTA_EXCEEDED,
        },
        sqlstates={"55P03": QUOTA_LOCK_TIMEOUT},
    ),
    # -- deleting a task's files (sql/44_executor_deletions.sql) ---------------------------
    "dlw.delete_task": Answers(
        success=frozenset({"requested", "unchanged"}),
        refusals={
            "NOT_FOUND": TASK_NOT_FOUND,
            "TASK_LIVE": Refusal(409, "TASK_LIVE", "the task is pending or running: cancel it first, then delete it"),
        },
    ),
    "dlw.quota_current": Answers(missing=TENANT_NOT_FOUND),
    # -- hub token (sql/32_hub_tokens.sql) -------------------------------------------------
    "dlw.set_hub_token": Answers(success=frozenset({"set", "rotated"})),
    "dlw.clear_hub_token": Answers(success=frozenset({"cleared"}), refusals={"NOT_SET": HUB_TOKEN_NOT_SET}),
    "insert_storage_target": Answers(
        sqlstates={
            "23505": Refusal(409, "STORAGE_TARGET_EXISTS", "the tenant has a storage target of that name"),
            # the trigger dlw.storage_target_limits (sql/20_tenants.sql)
            "DLW02": Refusal(409, "STORAGE_TARGET_LIMIT", "the tenant has as many storage targets as it may"),
            "DLW03": Refusal(422, "STORAGE_TARGET_CONFIG_TOO_LARGE", "the config is larger than allowed"),
            # sql/19_storage_roots.sql: the config's shape, and the cross-tenant root registry
            "DLW20": Refusal(422, "STORAGE_TARGET_CONFIG_INVALID", "the config has an unknown key or is not an object"),
            "DLW21": Refusal(422, "STORAGE_TARGET_CONFIG_SECRET", "a config key names a secret; configs hold none"),
            "DLW22": Refusal(422, "STORAGE_ROOT_INVALID", "the root is not an absolute, normalized directory path"),
            "DLW23": Refusal(422, "STORAGE_LAYOUT_UNKNOWN", "the layout is not one of tree, hf-cache"),
            "DLW24": Refusal(409, "STORAGE_ROOT_UNAVAILABLE", "the root is, contains or lies inside a root in use"),
        }
    ),
    # -- administration (sql/70_administration.sql) ----------------------------------------
    "dlw.platform_create_tenant": Answers(
        success=frozenset({"created"}),
        refusals={"TENANT_EXISTS": Refusal(409, "TENANT_EXISTS", "a tenant with that slug exists")},
    ),
    "dlw.platform_update_tenant": Answers(
        success=frozenset({"ok"}),
        refusals={
            "NOT_FOUND": TENANT_NOT_FOUND,
            "PLATFORM_TENANT": Refusal(409, "PLATFORM_TENANT", "the platform tenant cannot be changed so"),
        },
    ),
    "tenant_by_id": Answers(missing=TENANT_NOT_FOUND),
    "dlw.set_user_role": Answers(
        success=frozenset({"ok"}),
        refusals={
            "NOT_FOUND": Refusal(404, "USER_NOT_FOUND", "no such user in the tenant"),
            "LAST_TENANT_ADMIN": Refusal(409, "LAST_TENANT_ADMIN", "the tenant would have no admin left"),
            "ROLE_NOT_ASSIGNABLE": Refusal(422, "ROLE_NOT_ASSIGNABLE", "that role cannot be given to a user"),
        },
    ),
    "insert_service_account": Answers(
        sqlstates={"23505": Refusal(409, "SERVICE_ACCOUNT_EXISTS", "that client is already registered")}
    ),
    "delete_service_account": Answers(
        missing=Refusal(404, "SERVICE_ACCOUNT_NOT_FOUND", "no such service account in the tenant")
    ),
    # -- identity (sql/60_identity.sql) ----------------------------------------------------
    "dlw.login_user": Answers(
        success=frozenset({"ok"}),
        refusals={
            "TENANT_INACTIVE": TENANT_INACTIVE,
            "TENANT_UNRESOLVED": Refusal(
                403,
                "TENANT_UNRESOLVED",
                "no tenant rule admits this identity",
                extra={"message": "no tenant rule admits this identity"},
            ),
        },
    ),
    # -- executor (sql/40_executor.sql) ----------------------------------------------------
    "dlw.executor_claim": Answers(sqlstates=EXECUTOR_SQLSTATES),
    "dlw.executor_heartbeat": Answers(
        success=frozenset({"ok"}),
        refusals={
            **LEASE_REFUSALS,
            "SIZE_MISMATCH": Refusal(
                422, "SIZE_MISMATCH", "bytes_done beyond the declared size: nothing changed, lease not extended"
            ),
            "BAD_CHECKPOINT": BAD_CHECKPOINT,
        },
        sqlstates=EXECUTOR_SQLSTATES,
    ),
    "dlw.executor_complete": Answers(
        success=frozenset({"completed", "already_completed"}),
        refusals={
            **LEASE_REFUSALS,
            "SHA256_MISMATCH": Refusal(
                422, "SHA256_MISMATCH", "the content's sha256 is not the manifest's: the file failed", ("task_status",)
            ),
            "SIZE_MISMATCH": Refusal(
                422, "SIZE_MISMATCH", "bytes is not the file's declared size: the file failed", ("task_status",)
            ),
        },
        sqlstates=EXECUTOR_SQLSTATES,
    ),
    "dlw.executor_fail": Answers(
        success=frozenset({"requeued", "failed"}), refusals=LEASE_REFUSALS, sqlstates=EXECUTOR_SQLSTATES
    ),
    "dlw.executor_report_batch": Answers(sqlstates=EXECUTOR_SQLSTATES),
    "dlw.executor_claim_deletions": Answers(sqlstates=EXECUTOR_SQLSTATES),
    "dlw.executor_deletion_heartbeat": Answers(
        success=frozenset({"ok"}), refusals=DELETION_LEASE_REFUSALS, sqlstates=EXECUTOR_SQLSTATES
    ),
    "dlw.executor_deletion_complete": Answers(
        success=frozenset({"deleted", "already_deleted"}),
        refusals=DELETION_LEASE_REFUSALS,
        sqlstates=EXECUTOR_SQLSTATES,
    ),
    "dlw.executor_deletion_fail": Answers(
        success=frozenset({"requeued", "failed"}), refusals=DELETION_LEASE_REFUSALS, sqlstates=EXECUTOR_SQLSTATES
    ),
    "dlw.executor_release": Answers(
        success=frozenset({"released"}),
        refusals={**LEASE_REFUSALS, "BAD_CHECKPOINT": BAD_CHECKPOINT},
        sqlstates=EXECUTOR_SQLSTATES,
    ),
}


def answer_of(call: str, result: str | asyncpg.Record | Mapping[str, Any] | None) -> str:
    """The outcome of a SQL call when it is a listed success; raises the listed refusal, and
    fails closed (500, logged) on anything unlisted, a missing row or a NULL outcome included.

    result is the outcome itself or the result row (its `outcome` column; the refusal may copy
    further columns)."""
    answers = REGISTRY[call]
    row = None if result is None or isinstance(result, str) else result  # an asyncpg.Record is no Mapping
    outcome = result if row is None else row["outcome"]
    if isinstance(outcome, str):
        if outcome in answers.success:
            return outcome
        refusal = answers.refusals.get(outcome)
        if refusal is not None:
            raise refusal.error(row)
    log.error("%s answered an outcome the API does not know: %r", call, outcome)
    raise INTERNAL_ERROR.error()


def found(call: str, row: asyncpg.Record | None) -> asyncpg.Record:
    """The row a lookup found, or its registered `missing` refusal."""
    if row is not None:
        return row
    missing = REGISTRY[call].missing
    if missing is None:
        log.error("%s found no row and the API lists no answer for that", call)
        raise INTERNAL_ERROR.error()
    raise missing.error()


@contextmanager
def specific_sqlstates(*calls: str) -> Iterator[None]:
    """Within the block, a database error whose SQLSTATE one of the calls answers more
    specifically is answered so; anything else goes on to the general table."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        for call in calls:
            refusal = REGISTRY[call].sqlstates.get(exc.sqlstate or "")
            if refusal is not None:
                raise refusal.error() from exc
        raise
