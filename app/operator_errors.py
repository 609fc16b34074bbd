"""Operator errors: one line on stderr and an exit code, never a traceback.

Every `dlw` command runs under `reported()` (app/cli.py). A command refuses on purpose by raising
`OperatorError`; the usual accidents of operating a service (a URL that does not parse or does
not answer, a wrong password, a missing database, a closed pipe) are recognised here, in one
place, and turned into the same one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_FAILURE = 1  # the command ran and failed (database down, refused, ...)
EXIT_USAGE = 2  # the command was asked for something it cannot do as given (argparse's own code)


class OperatorError(Exception):
    """A refusal meant for the person at the terminal: a message and the exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: object) -> str:
    """Collapse a driver's multi-line message (libpq's "connection failed: ...\\nDETAIL") to one line."""
    return " ".join(str(text).split())


def _database_problem(exc: BaseException) -> str | None:
    """What a connection failure means, for asyncpg and psycopg alike; None if not one."""
    name = type(exc).__name__
    module = type(exc).__module__.split(".")[0]
    text = one_line(exc)
    if module == "asyncpg":
        import asyncpg

        if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            return f"the database refused the login ({text})"
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return f"no such database ({text})"
        if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.TooManyConnectionsError):
            return f"the database does not accept connections now ({text})"
        if isinstance(exc, asyncpg.ClientConfigurationError | asyncpg.InterfaceError):
            return f"invalid database URL ({text})"
        if isinstance(exc, asyncpg.PostgresError):
            return f"the database answered {getattr(exc, 'sqlstate', '?')}: {text}"
        return None
    if module == "psycopg":
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            if "password authentication failed" in text or "no password supplied" in text:
                return f"the database refused the login ({text})"
            if "does not exist" in text and "database" in text:
                return f"no such database ({text})"
            return f"cannot connect to the database ({text})"
        if isinstance(exc, psycopg.ProgrammingError) and ("missing" in text or "invalid" in text):
            return f"invalid database URL ({text})"
        if isinstance(exc, psycopg.Error) and getattr(exc, "sqlstate", None):
            return f"the database answered {exc.sqlstate}: {text}"  # type: ignore[attr-defined]
        return None
    if isinstance(exc, ConnectionError | TimeoutError) or name == "gaierror":
        return f"cannot connect ({name}: {text})"
    if isinstance(exc, ValueError) and "dsn" in text.lower():
        return f"invalid database URL ({text})"
    return None


def settings_problems(exc: BaseException) -> list[str] | None:
    """A DLW_* variable pydantic-settings refused, one entry each; None if `exc` is not that."""
    if type(exc).__name__ != "ValidationError" or not hasattr(exc, "errors"):
        return None
    return [f"DLW_{'_'.join(str(p) for p in err['loc']).upper()}: {one_line(err['msg'])}" for err in exc.errors()]


def describe(exc: BaseException) -> str | None:
    """The one line an operator should read for `exc`, or None when it is not an operator error."""
    if isinstance(exc, OperatorError):
        return str(exc)
    problems = settings_problems(exc)
    if problems:
        return "invalid setting " + "; ".join(problems)
    return _database_problem(exc)


def _quiet_broken_pipe() -> None:
    """`dlw ... | head`: the reader left. Point stdout at /dev/null so the interpreter's final
    flush cannot raise a second time (the recipe of Python's signal documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@contextmanager
def reported(prog: str = "dlw") -> Iterator[None]:
    """Run a command; an operator error becomes `prog: message` on stderr and SystemExit."""
    try:
        yield
    except BrokenPipeError:
        _quiet_broken_pipe()
        raise SystemExit(EXIT_FAILURE) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        message = describe(exc)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        raise SystemExit(exc.exit_code if isinstance(exc, OperatorError) else EXIT_FAILURE) from None
