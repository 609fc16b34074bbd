"""The authorization policy of app/authz/model.conf, held in indexes so that adding or removing
one rule costs O(1), whatever the number of rules, and a decision reads only the rules of the
roles the subject reaches.

pycasbin (the library the model is written for) keeps every rule in a list: adding one scans the
list for a duplicate, removing one scans it twice, and deleting a role link walks every role
known to its role manager, so each change was O(all grants) (bench/scale_grants.py measured it).
This evaluates the same model from a set of rules and two dicts:

  p rules   subject -> {(scope, obj, act)}; a rule allows when keyMatch(obj) and regexMatch(act)
            (casbin's own functions, imported below) and scope is "any" or the tenant is the same
  g links   name -> {role: how many g rules give it}; casbin's g(sub, role) is "role is sub, or
            is reached from sub through at most MAX_HOPS links" (its role manager's default
            max_hierarchy_level of 10 counts the name itself)

tests/api/test_policy_index.py compares every decision with pycasbin's enforce (this model file,
random policies with chains, cycles and wildcards, before and after random changes). Deliberate
differences, both failing closed where pycasbin raises (a 500 on every request reaching the rule):
a p rule without exactly 4 fields, a g rule with fewer than 2 and a p rule whose method pattern is
not a valid regular expression never allow. Like casbin's loader, ptypes the model does not define
(p2, g2, ...) are ignored; a g rule's fields past the second are ignored, as casbin truncates them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

from casbin.util import key_match, regex_match

log = logging.getLogger("dlw.rbac")

MAX_HOPS = 9
Rule = tuple[str, ...]  # (ptype, field, ...), empty fields dropped


class PolicyIndex:
    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: set[Rule] = set()
        self._p: dict[str, set[tuple[str, str, str]]] = {}
        self._links: dict[str, dict[str, int]] = {}
        for rule in rules:
            self.add(rule)

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, rule: object) -> bool:
        return rule in self._rules

    def rules(self) -> Iterator[Rule]:
        return iter(self._rules)

    def add(self, rule: Rule) -> bool:
        """Make the rule present; False when it already was."""
        if rule in self._rules:
            return False
        self._rules.add(rule)
        self._index(rule, 1)
        return True

    def remove(self, rule: Rule) -> bool:
        """Make the rule absent; False when it already was."""
        if rule not in self._rules:
            return False
        self._rules.remove(rule)
        self._index(rule, -1)
        return True

    def _index(self, rule: Rule, delta: int) -> None:
        ptype, fields = rule[0], rule[1:]
        if ptype == "p":
            if len(fields) != 4:
                log.warning("ignored policy rule %r: a p rule has 4 fields (sub, scope, obj, act)", rule)
                return
            sub, scope, obj, act = fields
            if delta > 0:
                self._p.setdefault(sub, set()).add((scope, obj, act))
            else:
                rules = self._p[sub]
                rules.discard((scope, obj, act))
                if not rules:
                    del self._p[sub]
        elif ptype == "g":
            if len(fields) < 2:
                log.warning("ignored policy rule %r: a g rule has 2 fields (subject, role)", rule)
                return
            user, role = fields[0], fields[1]
            roles = self._links.setdefault(user, {})
            count = roles.get(role, 0) + delta
            if count > 0:
                roles[role] = count
            else:
                del roles[role]
                if not roles:
                    del self._links[user]

    def roles(self, name: str) -> tuple[str, ...]:
        """The roles g rules give name directly (casbin's get_roles)."""
        return tuple(self._links.get(name, ()))

    def allows(self, sub: str, obj: str, act: str, same_tenant: bool) -> bool:
        """casbin's enforce(sub, t, obj, act, t if same_tenant else another) for model.conf."""
        seen, frontier = {sub}, [sub]
        for hop in range(MAX_HOPS + 1):
            for name in frontier:
                for scope, p_obj, p_act in self._p.get(name, ()):
                    if key_match(obj, p_obj) and _act_matches(act, p_act) and (scope == "any" or same_tenant):
                        return True
            if hop == MAX_HOPS:
                break
            above = []
            for name in frontier:
                for role in self._links.get(name, ()):
                    if role not in seen:
                        seen.add(role)
                        above.append(role)
            if not above:
                break
            frontier = above
        return False


def _act_matches(act: str, pattern: str) -> bool:
    try:
        return bool(regex_match(act, pattern))
    except re.error:
        log.warning("ignored policy method pattern %r: not a regular expression", pattern)
        return False
