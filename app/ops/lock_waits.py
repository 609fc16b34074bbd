"""How `dlw migrate` waits for the locks its steps take: at most `lock_timeout` at a time, a bounded
number of times, saying what it waits for.

Re-applying the program (DROP/CREATE POLICY, CREATE OR REPLACE VIEW) and most migrations take
exclusive table locks. A lock request that cannot be granted queues, and every later request for
the same table (each tenant's API queries) queues behind it, so one idle transaction holding a
share lock (an analyst's `BEGIN; SELECT * FROM reporting.tasks;`) would stop the API for as long
as it idles. With `lock_timeout` on every connection of a step, the step gives up after that
long, rolls back (releasing what it held, so the API's queries run again), and is retried after a
backoff; after the last attempt migrate fails with one line naming the blocking session.

While a step runs, a watcher on its own connection asks the server every fraction of the timeout
which sessions block the step's connections (pg_blocking_pids, pg_stat_activity): they are found
by the run's own application_name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg

from app.ops.queries import query

log = logging.getLogger("dlw.migrate")
T = TypeVar("T")


class MigrateLockTimeout(RuntimeError):
    """A step of `dlw migrate` could not take its locks within its bounded attempts."""


@dataclass(frozen=True)
class LockPolicy:
    timeout: float = 2.0  # seconds one lock request may wait (lock_timeout)
    attempts: int = 5
    backoff: float = 1.0  # seconds before the second attempt, doubling after each failure

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.attempts < 1 or self.backoff < 0:
            raise ValueError(f"invalid lock policy {self}")

    def delay(self, attempt: int) -> float:
        return float(self.backoff * 2 ** (attempt - 1))


def session_url(url: str, application_name: str, lock_timeout: float) -> str:
    """The same URL, its sessions named `application_name` and with `lock_timeout` set (added to
    any `options` the URL already carries)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    options = f"-c lock_timeout={max(1, round(lock_timeout * 1000))}"
    params["options"] = f"{params['options']} {options}" if params.get("options") else options
    params["application_name"] = application_name
    return urlunsplit(parts._replace(query=urlencode(params, quote_via=quote)))


def describe(blockers: Sequence[Sequence[Any]]) -> str:
    """`pid 123 (role rep_acme, application 'psql', idle in transaction for 42 s)`, for each."""
    if not blockers:
        return "a session that ended before it could be identified"
    return "; ".join(
        f"pid {pid} (role {role}, application {app or ''!r}, {state or 'unknown state'} for {seconds} s)"
        for pid, role, app, state, seconds in blockers
    )


class BlockerWatch:
    """Remembers the last sessions seen blocking a connection named `application_name`."""

    def __init__(self, url: str, application_name: str, every: float) -> None:
        self.url = url
        self.application_name = application_name
        self.every = every
        self.blockers: list[tuple[Any, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlw-migrate-lock-watch", daemon=True)

    def __enter__(self) -> BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            with psycopg.connect(
                self.url, autocommit=True, cursor_factory=psycopg.RawCursor, application_name="dlw migrate: lock watch"
            ) as conn:
                while not self._stop.wait(self.every):
                    rows = conn.execute(query("migrate_lock_blockers"), (self.application_name,)).fetchall()
                    if rows:
                        self.blockers = rows
        except psycopg.Error as exc:  # only the message loses its detail
            log.debug("lock watch failed: %s", exc)


def with_lock_retries(step: Callable[[], T], *, what: str, url: str, session: str, policy: LockPolicy) -> T:
    """Run `step` (whose connections are named `session` and carry lock_timeout) until it gets its
    locks, at most `policy.attempts` times; MigrateLockTimeout with one readable line after that."""
    for attempt in range(1, policy.attempts + 1):
        with BlockerWatch(url, session, every=min(0.25, policy.timeout / 4)) as watch:
            with contextlib.suppress(psycopg.errors.LockNotAvailable):
                return step()
        waits_for = describe(watch.blockers)
        if attempt == policy.attempts:
            pids = ", ".join(str(row[0]) for row in watch.blockers) or "<pid>"
            raise MigrateLockTimeout(
                f"gave up {what} after {policy.attempts} attempts (lock_timeout {policy.timeout:g} s each):"
                f" it waits for {waits_for}; end that transaction (SELECT pg_terminate_backend({pids}))"
                " or run dlw migrate again later"
            )
        delay = policy.delay(attempt)
        log.warning(
            "%s: no lock within %g s (attempt %d of %d), waiting for %s; retrying in %g s",
            what,
            policy.timeout,
            attempt,
            policy.attempts,
            waits_for,
            delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable")  # attempts >= 1
