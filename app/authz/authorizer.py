"""Decisions for require_perm: the policy of model.conf lives in a PolicyIndex
(app/authz/policy_index.py, casbin's semantics, O(1) per changed rule); a (role, obj, act,
same-tenant) question is evaluated once, then the answer is cached until the policy changes, so a
check costs a dict lookup.

Reloads follow dlw.grant_version, not the notifications themselves: any role that can connect
may NOTIFY the channel, so a notification only wakes the reloader, which waits a short
debounce (the rest of a burst collapses into it), reads the version (one tiny query) and
acts only when the version moved. It then applies just the rules changed since the version it
knows (dlw.casbin_rule_changes: work proportional to the change, not to the grants), and
reloads everything only when those changes are no longer all recorded (or on a reconnect)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from app.authz.adapter import file_rules, row_rule, table_rules
from app.authz.policy_index import PolicyIndex
from app.db.queries import SQL
from app.identity.principal import Principal

log = logging.getLogger("dlw.rbac")
CHANNEL = "dlw_casbin_rule"
GRANT_SUBJECT_PREFIX = "user:"
# Most privileged first: the database role a principal acts with is the first it holds.
ROLE_RANK = ("system_admin", "tenant_admin", "tenant_operator", "tenant_viewer", "executor")
# After a notification, wait this long before checking the version: a burst (or a flood) of
# notifications costs one check per debounce, and a real grant still lands well within 1 s.
DEBOUNCE_SECONDS = 0.1


class Authorizer:
    def __init__(self, pool: asyncpg.Pool, also: dict[str, Callable[[object], None]] | None = None) -> None:
        self.pool = pool
        # Other channels LISTENed to on the same connection (one listening connection per
        # instance): channel -> callback of the payload, also called (with None) after every
        # reconnection (a notification may have been missed meanwhile).
        self._also = dict(also or {})
        self._file_rules = frozenset(file_rules())
        self.policy = PolicyIndex()  # nothing is allowed until the first load (fail closed)
        # Bounded by roles x routes x 2, not by grants: decisions are asked of roles, never of users.
        self._decisions: dict[tuple[str, str, str, bool], bool] = {}
        # Counters for tests and metrics: policy updates (full loads + incremental ones), of which
        # full loads, version reads after a wake-up, and notifications received (from anyone).
        self.reloads = 0
        self.full_reloads = 0
        self.version_checks = 0
        self.notifications = 0
        self.version: int | None = None  # dlw.grant_version as of the last load
        self._wake = asyncio.Event()
        self._force_reload = False  # set on every (re)connect: notifications may have been missed
        self._tasks: list[asyncio.Task[None]] = []

    # -- decisions ----------------------------------------------------------------------
    def decide(self, role: str, obj: str, act: str, same_tenant: bool) -> bool:
        key = (role, obj, act, same_tenant)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self.policy.allows(role, obj, act, same_tenant)
            self._decisions[key] = decision
        return decision

    def roles_of(self, principal: Principal) -> tuple[str, ...]:
        """The principal's own role plus any granted to it by a g row `g, user:<user_id>, <role>`
        (the prefix keeps subjects and role names apart)."""
        return (principal.role, *self.policy.roles(GRANT_SUBJECT_PREFIX + principal.user_id))

    def acting_role(self, principal: Principal, obj: str, act: str, same_tenant: bool) -> str | None:
        """The most privileged of the principal's roles that allows act on obj, or None."""
        allowed = [r for r in self.roles_of(principal) if self.decide(r, obj, act, same_tenant)]
        if not allowed:
            return None
        return min(allowed, key=lambda r: ROLE_RANK.index(r) if r in ROLE_RANK else len(ROLE_RANK))

    # -- loading and live reload --------------------------------------------------------
    async def reload(self) -> None:
        """Load the policy (file + table) unconditionally."""
        await self._load(await self.pool.fetchval(SQL["grant_version"]))

    async def refresh(self) -> bool:
        """Catch up if dlw.grant_version moved since the last load; True if it did. Applies the
        rules changed since then, or reloads everything when they are not all recorded."""
        self.version_checks += 1
        if self.version is None:
            await self.reload()
            return True
        rows = await self.pool.fetch(SQL["grant_changes"], self.version)
        version, changes_from = rows[0]["version"], rows[0]["changes_from"]
        if version == self.version:
            return False
        if changes_from > self.version + 1:
            await self._load(await self.pool.fetchval(SQL["grant_version"]))
            return True
        await self._apply([r for r in rows if r["ptype"] is not None], version)
        return True

    async def _apply(self, rows: Sequence[Any], version: int) -> None:
        self.apply_changes(rows)
        self.version = version
        self.reloads += 1
        log.info(
            "authorization policy updated: %d rules (update %d, grant version %s)", len(rows), self.reloads, version
        )

    def apply_changes(self, rows: Sequence[Any]) -> None:
        """State, not events: each changed rule (a grant_changes row: ptype, v0..v5, present) is
        made present or absent as the table has it now (same snapshot as the version), so the
        order of the changes does not matter; O(1) per rule (tests/api/test_policy_index.py
        counts it). A rule of the built-in file stays whatever the table says."""
        for row in rows:
            rule = row_rule(row)
            if row["present"]:
                self.policy.add(rule)
            elif rule not in self._file_rules:
                self.policy.remove(rule)
        self._decisions.clear()

    async def _load(self, version: int | None) -> None:
        # The version is read before the rules: a change committed in between bumps the
        # version past the recorded one, so the next check reloads again (never misses it).
        policy = PolicyIndex(self._file_rules)
        for rule in await table_rules(self.pool):
            policy.add(rule)
        self.policy = policy
        self._decisions.clear()
        self.version = version
        self.reloads += 1
        self.full_reloads += 1
        log.info(
            "authorization policy loaded: %d rules (reload %d, grant version %s)", len(policy), self.reloads, version
        )

    async def start(self, listen_dsn: str) -> None:
        """Load the policy now, then follow its changes."""
        await self.reload()
        self._tasks = [asyncio.create_task(self._listen(listen_dsn)), asyncio.create_task(self._reloader())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notified(self, *_args: object) -> None:
        # The payload is ignored (empty from the trigger; anything from anyone else).
        self.notifications += 1
        self._wake.set()

    async def _reloader(self) -> None:
        # One check per burst: notifications that arrive during the debounce or the check
        # collapse into the (at most one) next round.
        while True:
            await self._wake.wait()
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self._wake.clear()
            force, self._force_reload = self._force_reload, False
            try:
                if force:
                    await self.reload()
                else:
                    await self.refresh()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("policy reload failed, retrying: %s", exc)
                self._force_reload = self._force_reload or force
                await asyncio.sleep(1)
                self._wake.set()

    async def _listen(self, dsn: str) -> None:
        """A dedicated connection LISTENs for grant changes; when it drops, reconnect and
        reload (changes may have been missed meanwhile)."""
        backoff = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(dsn, server_settings={"application_name": "dlw-api-listen"})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                for channel, callback in self._also.items():
                    await conn.add_listener(channel, lambda _c, _p, _ch, payload, f=callback: f(payload))
                    callback(None)
                self._force_reload = True
                self._wake.set()
                backoff = 0.5
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.execute(SQL["probe"]), timeout=5)  # detect silent drops
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the loop reconnects
                log.warning("policy listener lost its connection (%s); reconnecting", exc.__class__.__name__)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
