"""The domain facts: dlw.domain_facts() and the catalog (the source) against app/domain.py (the
mirror), the SQL functions that enforce them, and the Python copies not yet rewired."""

from __future__ import annotations

import re
import typing

import psycopg
import pytest
from psycopg.rows import dict_row

from app import domain
from app.config import Settings
from tests.support.database import MigratedDb

PYTHON_FACTS: dict[str, object] = {
    "platform_tenant_id": domain.PLATFORM_TENANT_ID,
    "roles": list(domain.ROLES),
    "tenant_roles": list(domain.TENANT_ROLES),
    "service_account_roles": list(domain.SERVICE_ACCOUNT_ROLES),
    "default_max_attempts": domain.DEFAULT_MAX_ATTEMPTS,
    "lease_seconds_min": domain.LEASE_SECONDS_MIN,
    "lease_seconds_max": domain.LEASE_SECONDS_MAX,
    "claim_max_files": domain.CLAIM_MAX_FILES,
    "tenant_slug_pattern": domain.TENANT_SLUG_PATTERN,
    "display_name_max_length": domain.DISPLAY_NAME_MAX_LENGTH,
    "storage_target_name_pattern": domain.STORAGE_TARGET_NAME_PATTERN,
    "login_name_pattern": domain.LOGIN_NAME_PATTERN,
    "login_name_reserved_pattern": domain.LOGIN_NAME_RESERVED_PATTERN,
    "storage_target_config_max_bytes": domain.STORAGE_TARGET_CONFIG_MAX_BYTES,
    "retry_backoff_base_seconds": domain.RETRY_BACKOFF_BASE_SECONDS,
    "retry_backoff_max_seconds": domain.RETRY_BACKOFF_MAX_SECONDS,
    "retry_after_max_seconds": domain.RETRY_AFTER_MAX_SECONDS,
    "storage_gb_bytes": domain.STORAGE_GB_BYTES,
    "quota_metrics": list(domain.QUOTA_METRICS),
}


def test_domain_facts_in_sql_and_python_agree(db: MigratedDb):
    with db.owner() as conn:
        cur = conn.cursor(row_factory=dict_row)
        facts = cur.execute("SELECT * FROM dlw.domain_facts()").fetchall()
        volatility = conn.execute("SELECT provolatile FROM pg_proc WHERE oid = 'dlw.domain_facts()'::regprocedure")
        assert volatility.fetchone() == ("i",)
    assert len(facts) == 1
    assert facts[0] == PYTHON_FACTS


def column_defaults(conn: psycopg.Connection, table: str, columns: str) -> dict[str, object]:
    """The defaults of the table's columns whose names match the regular expression `columns`,
    evaluated as the database would (the default expressions are constants)."""
    defaults = conn.execute(
        """
        SELECT a.attname, pg_get_expr(d.adbin, d.adrelid)
          FROM pg_attrdef d
          JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE d.adrelid = %s::regclass AND a.attname ~ %s""",
        (table, columns),
    ).fetchall()
    return {name: conn.execute(f"SELECT {expr}").fetchone()[0] for name, expr in defaults}  # type: ignore[index]


def test_tenant_quota_defaults_are_the_column_defaults(db: MigratedDb):
    with db.owner() as conn:
        values = column_defaults(conn, "dlw.tenants", "^quota_")
    assert values == {
        "quota_concurrent": domain.DEFAULT_QUOTA_CONCURRENT,
        "quota_bytes_month": domain.DEFAULT_QUOTA_BYTES_MONTH,
        "quota_storage_gb": domain.DEFAULT_QUOTA_STORAGE_GB,
        "quota_tasks_per_minute": domain.DEFAULT_QUOTA_TASKS_PER_MINUTE,
        "quota_storage_targets": domain.DEFAULT_QUOTA_STORAGE_TARGETS,
    }


def test_reporting_login_limit_defaults_are_the_column_defaults(db: MigratedDb):
    with db.owner() as conn:
        values = column_defaults(
            conn,
            "dlw.reporting_logins",
            "^(connection_limit|statement_timeout_ms|idle_in_transaction_timeout_ms|temp_file_limit_kb|transaction_timeout_ms)$",
        )
        limit_check = _check(conn, "dlw.reporting_logins", "connection_limit")
    assert values == {
        "connection_limit": domain.DEFAULT_REPORTING_CONNECTION_LIMIT,
        "statement_timeout_ms": domain.DEFAULT_REPORTING_STATEMENT_TIMEOUT_MS,
        "idle_in_transaction_timeout_ms": domain.DEFAULT_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_MS,
        "temp_file_limit_kb": domain.DEFAULT_REPORTING_TEMP_FILE_LIMIT_KB,
        "transaction_timeout_ms": domain.DEFAULT_REPORTING_TRANSACTION_TIMEOUT_MS,
    }
    assert f"(connection_limit <= {domain.REPORTING_CONNECTION_LIMIT_MAX})" in limit_check, limit_check


def _check(conn: psycopg.Connection, table: str, column: str) -> str:
    (definition,) = conn.execute(
        "SELECT string_agg(pg_get_constraintdef(c.oid), ' ') FROM pg_constraint c"
        " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.conrelid = %s::regclass AND c.contype = 'c' AND a.attname = %s",
        (table, column),
    ).fetchone()
    return str(definition)


def test_table_checks_repeat_the_facts(db: MigratedDb):
    """The CHECK constraints of migrations/ (history, not editable) hold the same facts."""
    with db.owner() as conn:
        literals = {
            table: re.findall(r"'([a-z_]+)'::text", _check(conn, table, "role"))
            for table in ("dlw.users", "dlw.service_accounts")
        }
        assert literals == {
            "dlw.users": list(domain.TENANT_ROLES),
            "dlw.service_accounts": list(domain.SERVICE_ACCOUNT_ROLES),
        }
        statuses = {
            table: re.findall(r"'([a-z_]+)'::text", _check(conn, table, "status"))
            for table in ("dlw.tasks", "dlw.task_files")
        }
        assert statuses == {"dlw.tasks": list(domain.TASK_STATUSES), "dlw.task_files": list(domain.FILE_STATUSES)}
        deletion = {
            (table, column): re.findall(r"'([a-z_]+)'::text", _check(conn, table, column))
            for table, column in (("dlw.tasks", "deletion"), ("dlw.task_deletions", "status"))
        }
        assert deletion == {
            ("dlw.tasks", "deletion"): list(domain.TASK_DELETION_STATES),
            ("dlw.task_deletions", "status"): list(domain.DELETION_STATUSES),
        }
        assert f"'{domain.TENANT_SLUG_PATTERN}'" in _check(conn, "dlw.tenants", "slug")
        assert f"{domain.DISPLAY_NAME_MAX_LENGTH}" in _check(conn, "dlw.tenants", "display_name")
        assert f"'{domain.STORAGE_TARGET_NAME_PATTERN}'" in _check(conn, "dlw.storage_targets", "name")
        arguments = dict(
            conn.execute(
                "SELECT p.proname, pg_get_function_arguments(p.oid) FROM pg_proc p"
                " WHERE p.oid IN ('dlw.executor_claim(integer,integer,text,integer)'::regprocedure,"
                "                 'dlw.executor_fail(uuid,uuid,text,boolean,integer,integer)'::regprocedure)"
            ).fetchall()
        )
    for name, signature in arguments.items():
        assert f"p_max_attempts integer DEFAULT {domain.DEFAULT_MAX_ATTEMPTS}" in signature, name


@pytest.mark.parametrize(
    ("max_files", "lease_seconds", "refused"),
    [
        (domain.CLAIM_MAX_FILES, domain.LEASE_SECONDS_MIN, False),
        (1, domain.LEASE_SECONDS_MAX, False),
        (domain.CLAIM_MAX_FILES + 1, 60, True),
        (1, domain.LEASE_SECONDS_MIN - 1, True),
        (1, domain.LEASE_SECONDS_MAX + 1, True),
    ],
)
def test_the_claim_enforces_the_executor_limits(db: MigratedDb, max_files: int, lease_seconds: int, refused: bool):
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT dlw.set_context(0, 'facts', 'executor')")
            if refused:
                with pytest.raises(psycopg.errors.InvalidParameterValue):
                    conn.execute("SELECT * FROM dlw.executor_claim(%s, %s)", (max_files, lease_seconds))
            else:
                conn.execute("SELECT * FROM dlw.executor_claim(%s, %s)", (max_files, lease_seconds)).fetchall()


def test_python_copies_outside_app_domain_agree():
    """The request models and settings built from app.domain expose the same values; the role
    Literals (a Literal cannot be built from a tuple) spell them out and must match."""
    from app.api.routes import administration, executor, storage_targets, tasks

    claim = executor.ClaimRequest.model_json_schema()["properties"]
    assert claim["max_files"]["maximum"] == domain.CLAIM_MAX_FILES
    assert (claim["lease_seconds"]["minimum"], claim["lease_seconds"]["maximum"]) == (
        domain.LEASE_SECONDS_MIN,
        domain.LEASE_SECONDS_MAX,
    )
    tenant = administration.TenantCreate.model_json_schema()["properties"]
    assert tenant["slug"]["pattern"] == domain.TENANT_SLUG_PATTERN
    assert tenant["display_name"]["maxLength"] == domain.DISPLAY_NAME_MAX_LENGTH
    assert (tenant["quota_concurrent"]["default"], tenant["quota_bytes_month"]["default"]) == (
        domain.DEFAULT_QUOTA_CONCURRENT,
        domain.DEFAULT_QUOTA_BYTES_MONTH,
    )
    assert tenant["quota_storage_gb"]["default"] == domain.DEFAULT_QUOTA_STORAGE_GB
    assert typing.get_args(administration.TenantRole) == domain.TENANT_ROLES
    assert typing.get_args(administration.ServiceAccountRole) == domain.SERVICE_ACCOUNT_ROLES
    assert typing.get_args(tasks.TaskStatus) == domain.TASK_STATUSES
    target = storage_targets.StorageTargetCreate.model_json_schema()["properties"]
    assert target["name"]["pattern"] == domain.STORAGE_TARGET_NAME_PATTERN
    assert Settings.model_fields["executor_max_attempts"].default == domain.DEFAULT_MAX_ATTEMPTS
