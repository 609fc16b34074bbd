"""Domain facts the Python layer shares with the database.

The database is the source: `dlw.domain_facts()` (sql/01_domain_facts.sql) for roles, the
platform tenant, executor limits and name patterns, the column defaults of `dlw.tenants`
(migrations/0002.schema.sql) for the default quotas, and those of `dlw.reporting_logins`
(migrations/0013.reporting_login_limits.sql, 0014.reporting_transaction_age.sql) for the
reporting logins' limits, and the CHECK constraints of dlw.tasks and dlw.task_files
(migrations/0002.schema.sql) for the statuses. These constants mirror them;
tests/sql/test_domain_facts.py fails when a value here and the database disagree. Change both
together.
"""

from __future__ import annotations

from typing import Final

PLATFORM_TENANT_ID: Final[int] = 1
"""The service token's and system_admin's tenant; it cannot be deactivated."""

TENANT_ROLES: Final[tuple[str, ...]] = ("tenant_admin", "tenant_operator", "tenant_viewer")
"""Roles a user holds within a tenant (assignable and grantable)."""
ROLES: Final[tuple[str, ...]] = ("system_admin", *TENANT_ROLES, "executor")
"""Every principal role."""
SERVICE_ACCOUNT_ROLES: Final[tuple[str, ...]] = (*TENANT_ROLES, "executor")
"""Roles a service account may have."""

TASK_STATUSES: Final[tuple[str, ...]] = ("pending", "running", "succeeded", "failed", "cancelled")
"""dlw.tasks.status: pending -> running -> succeeded | failed; pending/running -> cancelled."""
FILE_STATUSES: Final[tuple[str, ...]] = ("pending", "assigned", "running", "succeeded", "failed", "cancelled")
"""dlw.task_files.status."""
TASK_DELETION_STATES: Final[tuple[str, ...]] = ("deleting", "deleted", "failed")
"""dlw.tasks.deletion (NULL: files kept): DELETE /tasks/{id} -> deleting -> deleted | failed."""
DELETION_STATUSES: Final[tuple[str, ...]] = ("pending", "assigned", "done", "failed")
"""dlw.task_deletions.status: the deletion work item executors claim."""

DEFAULT_QUOTA_CONCURRENT: Final[int] = 10
"""Live (pending or running) tasks per tenant; 0 = unlimited."""
DEFAULT_QUOTA_BYTES_MONTH: Final[int] = 1 << 40
"""Bytes per UTC calendar month (1 TiB); 0 = unlimited."""
DEFAULT_QUOTA_STORAGE_GB: Final[int] = 1024
"""Storage allowance in GB; 0 = unlimited."""
STORAGE_GB_BYTES: Final[int] = 1_000_000_000
"""Bytes in one GB of quota_storage_gb and storage_gb_used."""
QUOTA_METRICS: Final[tuple[str, ...]] = ("concurrent_tasks", "tasks_per_minute", "bytes_month", "storage_gb")
"""The metric a 429 QUOTA_EXCEEDED names, in the order admission checks them."""
DEFAULT_QUOTA_TASKS_PER_MINUTE: Final[int] = 120
"""Tasks created in any 60 seconds (cancelled ones included); 0 = unlimited."""
DEFAULT_QUOTA_STORAGE_TARGETS: Final[int] = 20
"""Storage targets per tenant (the default one included); 0 = unlimited."""

DEFAULT_MAX_ATTEMPTS: Final[int] = 5
"""Claims of a file before an expired lease or a retryable failure fails it."""
LEASE_SECONDS_MIN: Final[int] = 5
LEASE_SECONDS_MAX: Final[int] = 3600
"""Bounds of an executor lease, in seconds."""
CLAIM_MAX_FILES: Final[int] = 100
"""Most files one executor claim returns."""
CLAIM_WAIT_SECONDS_MAX: Final[int] = 20
"""Longest wait of a long-poll claim (wait_seconds). The API's own bound, not a database fact:
the claim function never waits (app/api/queue_wakeup.py); below the executor's 30 s timeout."""
RETRY_BACKOFF_BASE_SECONDS: Final[int] = 2
RETRY_BACKOFF_MAX_SECONDS: Final[int] = 300
"""A retryable failure on attempt n waits min(max, base * 2**(n-1) * (1 + jitter in [0, 1)))
seconds before its file is offered again (the database keeps it: dlw.retry_backoff)."""
RETRY_AFTER_MAX_SECONDS: Final[int] = 3600
"""Longest Retry-After of a hub that is honoured (a longer one waits this long)."""

TENANT_SLUG_PATTERN: Final[str] = r"^[a-z][a-z0-9-]{1,62}$"
DISPLAY_NAME_MAX_LENGTH: Final[int] = 200
STORAGE_TARGET_NAME_PATTERN: Final[str] = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
STORAGE_TARGET_CONFIG_MAX_BYTES: Final[int] = 16384
"""Most bytes of a storage target's config (its JSON text, as the database prints it)."""
STORAGE_LAYOUTS: Final[tuple[str, ...]] = ("tree", "hf-cache")
"""Layouts a storage target may name (dlw.storage_layouts(), sql/19_storage_roots.sql); first = default."""
LOGIN_NAME_PATTERN: Final[str] = r"^[a-z_][a-z0-9_.@-]{0,62}$"
"""Reporting login names; those matching LOGIN_NAME_RESERVED_PATTERN are refused."""
LOGIN_NAME_RESERVED_PATTERN: Final[str] = r"^(pg_|dlw_)"

DEFAULT_REPORTING_CONNECTION_LIMIT: Final[int] = 5
"""CONNECTION LIMIT of a new reporting login (settable from 1 to REPORTING_CONNECTION_LIMIT_MAX)."""
REPORTING_CONNECTION_LIMIT_MAX: Final[int] = 100
DEFAULT_REPORTING_STATEMENT_TIMEOUT_MS: Final[int] = 300_000
"""statement_timeout of a new reporting login (5 min); the watchdog enforces it."""
DEFAULT_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_MS: Final[int] = 300_000
"""idle_in_transaction_session_timeout of a new reporting login (5 min); the watchdog enforces it."""
DEFAULT_REPORTING_TRANSACTION_TIMEOUT_MS: Final[int] = 900_000
"""Longest transaction of a new reporting login (15 min); the watchdog alone enforces it."""
DEFAULT_REPORTING_TEMP_FILE_LIMIT_KB: Final[int] = 1 << 20
"""temp_file_limit of a new reporting login (1 GB, in kB); a login cannot raise it."""
