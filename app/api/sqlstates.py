"""SQLSTATE → HTTP: the one table that says how a database error is answered.

Modelled on PostgREST's mapSQLtoHTTP. An exact SQLSTATE wins over its two-character class; an
error in neither is a 500 INTERNAL_ERROR (logged with its trace). A SQL call may answer some
SQLSTATEs more specifically (app/api/refusals.py, `sqlstates=`), e.g. QUOTA_LOCK_TIMEOUT.
"""

from __future__ import annotations

import asyncpg

from app.api.errors import COMMIT_UNCERTAIN, DB_FORBIDDEN, DB_UNAVAILABLE, Refusal

ILLEGAL_TRANSITION = Refusal(409, "ILLEGAL_TRANSITION", "the state machine refused the change (SQLSTATE DLW01)")
INVALID_ARGUMENT = Refusal(422, "INVALID_ARGUMENT", "the database refused an argument (22xxx, 23514)")
NOT_FOUND = Refusal(404, "NOT_FOUND", "the database found no such row (P0002)")
CONFLICT = Refusal(409, "CONFLICT", "a unique or foreign key refused the change (23505, 23503)")
LOCK_TIMEOUT = Refusal(503, "LOCK_TIMEOUT", "a lock was not available in time (55P03)", retry_after=1)
DB_RETRY = Refusal(503, "DB_RETRY", "a serialization failure or deadlock: retry (40001, 40P01)", retry_after=1)

SQLSTATE_ANSWERS: dict[str, Refusal] = {
    "DLW01": ILLEGAL_TRANSITION,  # task/file state machine triggers (sql/30_tasks.sql)
    "22023": INVALID_ARGUMENT,  # invalid_parameter_value, raised by SQL functions
    "22P02": INVALID_ARGUMENT,  # invalid_text_representation
    "22003": INVALID_ARGUMENT,  # numeric_value_out_of_range
    "22004": INVALID_ARGUMENT,  # null_value_not_allowed, raised by SQL functions
    "23514": INVALID_ARGUMENT,  # check_violation
    "23502": INVALID_ARGUMENT,  # not_null_violation
    "23505": CONFLICT,  # unique_violation (keys lead with tenant_id: nothing leaks)
    "23503": CONFLICT,  # foreign_key_violation
    "P0002": NOT_FOUND,  # no_data_found
    "42501": DB_FORBIDDEN,  # insufficient_privilege: RLS or a definer function refused
    "55P03": LOCK_TIMEOUT,  # lock_not_available
    "40001": DB_RETRY,  # serialization_failure
    "40P01": DB_RETRY,  # deadlock_detected
    "08": DB_UNAVAILABLE,  # connection_exception (class)
    "53300": DB_UNAVAILABLE,  # too_many_connections
    "57P01": DB_UNAVAILABLE,  # admin_shutdown
    "57P02": DB_UNAVAILABLE,  # crash_shutdown
    "57P03": DB_UNAVAILABLE,  # cannot_connect_now
    "25006": DB_UNAVAILABLE,  # read_only_sql_transaction: a standby, or a node fenced during failover
}

# Failures without a SQLSTATE that still mean "the database cannot serve right now": the OS's
# (a reset connection), a pool acquire or connect timeout, and asyncpg's client-side errors (a
# connection closed mid-operation, "cannot switch to state N" while it resets a dead one).
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# SQLSTATEs meaning the session is gone (or never started): connection_exception, the
# operator-intervention shutdowns, cannot_connect_now, too_many_connections.
CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def answer_for_sqlstate(sqlstate: str | None) -> Refusal | None:
    """The table's answer for a SQLSTATE (exact code, else its class), or None."""
    if not sqlstate:
        return None
    return SQLSTATE_ANSWERS.get(sqlstate) or SQLSTATE_ANSWERS.get(sqlstate[:2])


def is_connection_fault(exc: BaseException) -> bool:
    """Whether exc means the database connection failed (rather than the database refusing)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        return sqlstate in CONNECTION_SQLSTATES or sqlstate[:2] in CONNECTION_SQLSTATES
    return isinstance(exc, UNAVAILABLE_ERRORS)


class CommitUncertain(Exception):
    """The connection failed while COMMIT was on its way: the change may or may not be made."""


def answer_for(exc: BaseException) -> Refusal | None:
    """The answer for a database failure, or None for anything the table does not list.

    A connection fault anywhere in the exception's chain (a library wrapping it) is one too."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, CommitUncertain):
            return COMMIT_UNCERTAIN
        if isinstance(current, asyncpg.PostgresError):
            answer = answer_for_sqlstate(current.sqlstate)
            if answer is not None or current is exc:
                return answer
        elif is_connection_fault(current):
            return DB_UNAVAILABLE
        current = current.__cause__ or current.__context__
        seen += 1
    return None
