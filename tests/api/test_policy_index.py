"""The PolicyIndex (app/authz/policy_index.py) against pycasbin, the reference for model.conf:
every decision and every direct-role lookup agree over random policies (role chains longer than
casbin's hierarchy limit, cycles, wildcards, both scopes) before and after random changes. And a
change costs O(1) work whatever the number of rules: counted as the comparisons it makes with the
rules held (each held field counts its comparisons), not timed."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import casbin
import psycopg
import pytest

from app.authz import policy_index
from app.authz.adapter import FIELDS, file_rules
from app.authz.authorizer import Authorizer
from app.authz.policy_index import MAX_HOPS, PolicyIndex, Rule
from tests.support.database import MigratedDb

MODEL = str(Path(policy_index.__file__).with_name("model.conf"))
ROLES = [f"role{i}" for i in range(12)] + ["tenant_admin", "tenant_operator", "tenant_viewer", "system_admin"]
USERS = [f"user:u{i}" for i in range(10)]
PATTERNS = ["/a", "/a/*", "/a/*/x", "/a/b", "/b", "*", "/a/", "/api/v1/tasks", "/api/v1/tasks/*"]
METHODS = ["^(GET)$", "^(GET|POST)$", "^(POST)$", "GET", ".*", "P", "^(DELETE|PATCH)$"]
OBJECTS = ["/a", "/a/1", "/a/1/x", "/a/b", "/ab", "/b", "", "/a/", "/api/v1/tasks", "/api/v1/tasks/{task_id}"]
ACTS = ["GET", "POST", "POSTX", "PATCH", "DELETE", "PUT"]


def casbin_decisions(rules: set[Rule], asks: list[tuple[str, str, str, bool]]) -> list[bool]:
    """pycasbin's enforce with model.conf, built from scratch from the rules (its full load)."""
    enforcer = casbin.Enforcer(MODEL)
    for ptype, *fields in sorted(rules):
        enforcer.model.add_policy(ptype[0], ptype, fields)
    enforcer.build_role_links()
    return [bool(enforcer.enforce(s, "t", o, a, "t" if same else "other")) for s, o, a, same in asks]


def casbin_roles(rules: set[Rule], names: list[str]) -> list[set[str]]:
    enforcer = casbin.Enforcer(MODEL)
    for ptype, *fields in sorted(rules):
        enforcer.model.add_policy(ptype[0], ptype, fields)
    enforcer.build_role_links()
    return [set(enforcer.get_role_manager().get_roles(n)) for n in names]


def random_rule(rng: random.Random) -> Rule:
    names = ROLES + USERS
    if rng.random() < 0.5:
        link = (rng.choice(names), rng.choice(ROLES))
        return ("g", *link, "extra") if rng.random() < 0.05 else ("g", *link)  # casbin ignores field 3
    return ("p", rng.choice(ROLES + USERS[:2]), rng.choice(["tenant", "any"]), rng.choice(PATTERNS),
            rng.choice(METHODS))  # fmt: skip


def random_asks(rng: random.Random, count: int) -> list[tuple[str, str, str, bool]]:
    subjects = ROLES + USERS + ["nobody"]
    return [(rng.choice(subjects), rng.choice(OBJECTS), rng.choice(ACTS), rng.random() < 0.5) for _ in range(count)]


def chain(length: int) -> set[Rule]:
    """role0 < role1 < ... < role<length>, with a p rule on the top role only."""
    rules: set[Rule] = {("g", f"role{i}", f"role{i + 1}") for i in range(length)}
    rules.add(("p", f"role{length}", "tenant", "/a", "^(GET)$"))
    return rules


@pytest.mark.parametrize("length", [MAX_HOPS - 1, MAX_HOPS, MAX_HOPS + 1])
def test_the_role_hierarchy_limit_is_casbins(length: int):
    rules = chain(length)
    asks = [("role0", "/a", "GET", True), ("role1", "/a", "GET", True)]
    index = PolicyIndex(rules)
    assert [index.allows(*ask) for ask in asks] == casbin_decisions(rules, asks)
    assert index.allows("role0", "/a", "GET", True) is (length <= MAX_HOPS)


@pytest.mark.parametrize("seed", range(40))
def test_random_policies_decide_as_casbin_does(seed: int):
    rng = random.Random(seed)
    rules = {random_rule(rng) for _ in range(rng.randint(1, 60))} | set(file_rules())
    if seed % 4 == 0:
        rules |= chain(MAX_HOPS + 2)
    asks = random_asks(rng, 250)
    index = PolicyIndex(rules)
    assert [index.allows(*ask) for ask in asks] == casbin_decisions(rules, asks)
    names = ROLES + USERS
    assert [set(index.roles(n)) for n in names] == casbin_roles(rules, names)
    assert any(index.allows(*ask) for ask in asks) and not all(index.allows(*ask) for ask in asks)


@pytest.mark.parametrize("seed", range(15))
def test_random_changes_leave_what_a_full_load_gives(seed: int):
    rng = random.Random(1000 + seed)
    rules = {random_rule(rng) for _ in range(40)}
    index = PolicyIndex(rules)
    asks = random_asks(rng, 150)
    for _ in range(8):
        for _ in range(rng.randint(1, 6)):
            if rules and rng.random() < 0.5:
                rule = rng.choice(sorted(rules))
                rules.discard(rule)
                assert index.remove(rule)
                assert not index.remove(rule)  # state, not events: a second removal changes nothing
            else:
                rule = random_rule(rng)
                assert index.add(rule) is (rule not in rules)
                rules.add(rule)
        assert len(index) == len(rules)
        assert [index.allows(*ask) for ask in asks] == casbin_decisions(rules, asks)
        assert [set(index.roles(n)) for n in USERS] == casbin_roles(rules, USERS)


def test_a_g_link_stays_while_any_rule_gives_it():
    index = PolicyIndex([("g", "user:a", "tenant_admin"), ("g", "user:a", "tenant_admin", "extra")])
    index.remove(("g", "user:a", "tenant_admin", "extra"))
    assert index.roles("user:a") == ("tenant_admin",)
    index.remove(("g", "user:a", "tenant_admin"))
    assert index.roles("user:a") == ()


def test_malformed_rules_never_allow():
    index = PolicyIndex([("p", "r", "any", "/a"), ("p", "r", "any", "/a", "^(GET)$", "x"), ("g", "r"),
                         ("p", "r", "any", "/b", "^(GET"), ("p2", "r", "any", "/c", "GET")])  # fmt: skip
    assert not any(index.allows("r", obj, "GET", True) for obj in ("/a", "/b", "/c"))
    assert index.roles("r") == ()


# -- the cost of a change, counted ------------------------------------------------------------
class Counted(str):
    """A held field whose comparisons are counted (Python asks the subclass first, whichever
    side it is on): a set or dict lookup compares with the one matching entry, a list scan with
    every element (pycasbin's has_policy and remove_policy do that)."""

    ops = 0

    def __hash__(self) -> int:
        Counted.ops += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        Counted.ops += 1
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        Counted.ops += 1
        return str.__ne__(self, other)


def counted(*fields: str) -> Rule:
    return tuple(Counted(f) for f in fields)


def hold_counted(authz: Authorizer) -> None:
    """Make every rule the authorizer holds count its comparisons."""
    authz.policy = PolicyIndex(counted(*rule) for rule in authz.policy.rules())


def change(rule: Rule, present: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(FIELDS, "")
    row.update(zip(FIELDS, rule, strict=False), present=present)
    return row


def cost_of_changes(size: int) -> list[int]:
    authz = Authorizer(cast(asyncpg.Pool, None))  # apply_changes never touches the pool
    for i in range(size):
        authz.policy.add(("g", f"user:many-{i}", "tenant_operator"))
        authz.policy.add(("p", f"role-{i}", "tenant", "/api/v1/tasks", "^(GET)$"))
    hold_counted(authz)
    changes = [  # each touches entries held since before: the counter sees every comparison
        ("g", "user:many-3", "tenant_admin", True),  # one more role for a user
        ("g", "role-7", "tenant_admin", True),  # a role under another
        ("p", "role-5", "any", "/api/v1/audit", "^(GET)$", True),  # a permission
        ("g", "user:many-4", "tenant_operator", False),  # revocations
        ("g", "user:many-3", "tenant_admin", False),
        ("p", "role-6", "tenant", "/api/v1/tasks", "^(GET)$", False),
    ]
    costs = []
    for *rule, present in changes:
        row = change(tuple(rule), present)
        Counted.ops = 0
        authz.apply_changes([row])
        costs.append(Counted.ops)
        assert (tuple(rule) in authz.policy) is present
    return costs


def test_a_grant_and_a_revoke_cost_the_same_at_10_and_at_5000_rules():
    small, large = cost_of_changes(10), cost_of_changes(5000)
    assert small == large, (small, large)
    assert sum(large) > 0  # the held entries were compared with: the counter saw it
    assert max(large) <= 20  # a few fields of the few entries involved, not one per rule
    # The counter does see a scan: what pycasbin's list membership test costs at 5000 rules.
    rules = [list(counted("g", f"user:many-{i}", "tenant_operator")) for i in range(5000)]
    Counted.ops = 0
    assert ["g", "user:new", "tenant_admin"] not in rules
    assert Counted.ops >= 5000


class CountingAuthorizer(Authorizer):
    """Counts the rules the catch-up hands over and the work applying them costs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.applied: list[tuple[int, int]] = []

    def apply_changes(self, rows: Any) -> None:
        Counted.ops = 0
        super().apply_changes(rows)
        self.applied.append((len(rows), Counted.ops))


@pytest.fixture
def owner(db: MigratedDb) -> Iterator[psycopg.Connection]:
    with db.owner() as conn:
        yield conn
        conn.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:cost-%'")


async def _catch_up_costs(db: MigratedDb, owner: psycopg.Connection, grants: int) -> list[tuple[int, int]]:
    owner.execute("DELETE FROM dlw.casbin_rule WHERE v0 LIKE 'user:cost-%'")
    owner.execute(
        "INSERT INTO dlw.casbin_rule (ptype, v0, v1)"
        " SELECT 'g', 'user:cost-' || g, 'tenant_viewer' FROM generate_series(1, %s) g",
        (grants,),
    )
    pool = await asyncpg.create_pool(db.app_url, min_size=1, max_size=1)
    try:
        authz = CountingAuthorizer(pool)
        await authz.reload()
        hold_counted(authz)
        # One more role for a user who has one, then the revocation of another user's only role.
        owner.execute("INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:cost-5', 'tenant_admin')")
        assert await authz.refresh()
        assert set(authz.policy.roles("user:cost-5")) == {"tenant_viewer", "tenant_admin"}
        owner.execute("DELETE FROM dlw.casbin_rule WHERE v0 = 'user:cost-6'")
        assert await authz.refresh()
        assert authz.policy.roles("user:cost-6") == ()
        assert authz.full_reloads == 1
        return authz.applied
    finally:
        await pool.close()


def test_the_catch_up_hands_over_and_applies_only_the_changed_rule(db: MigratedDb, owner: psycopg.Connection):
    small = asyncio.run(_catch_up_costs(db, owner, 10))
    large = asyncio.run(_catch_up_costs(db, owner, 3000))
    assert [rows for rows, _ in large] == [1, 1]  # a grant, then a revocation: one rule each
    assert small == large, (small, large)
    assert all(ops > 0 for _, ops in large)  # the held entries were compared with: the counter saw it
