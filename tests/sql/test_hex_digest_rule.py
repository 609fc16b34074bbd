"""One rule for a hex digest (migrations/0033): dlw.hex_digits_ok(value, length) accepts exactly
what '^[0-9a-f]{length}$' accepted (it replaced that regular expression, which built a
length-state automaton on every evaluation), and every constraint and executor argument check
that spelled the expression calls it instead."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.database import MigratedDb
from tests.support.tenants import as_tenant

SHA = "0123456789abcdef" * 4
SAMPLES = [
    SHA,
    SHA[:40],
    SHA[:63],
    SHA + "0",
    SHA.upper(),
    SHA[:63] + "A",
    SHA[:63] + "g",
    SHA[:63] + " ",
    SHA[:63] + "\n",
    SHA + "\n",
    "\n" + SHA,
    SHA[:62] + "é",  # 63 characters, 64 bytes
    SHA[:63] + "é",  # 64 characters, 65 bytes
    SHA[:63] + "٣",  # a digit, but not an ASCII one
    "",
]
CONSTRAINTS = {
    "task_files_sha256_check": "CHECK (dlw.hex_digits_ok(sha256, 64))",
    "task_files_resume_sha256": "CHECK (dlw.hex_digits_ok(resume_sha256, 64))",
    "task_files_blob_sha256": "CHECK (dlw.hex_digits_ok(blob_sha256, 64))",
    "stored_blobs_sha256": "CHECK (dlw.hex_digits_ok(sha256, 64))",
    "tasks_commit_sha": "CHECK (dlw.hex_digits_ok(commit, 40))",
}


@pytest.mark.parametrize("length", [40, 64])
def test_the_rule_accepts_exactly_what_the_regular_expression_accepted(db: MigratedDb, length: int):
    with psycopg.connect(db.app_url) as conn:
        verdicts = {
            s: conn.execute(
                "SELECT dlw.hex_digits_ok(%s, %s), %s ~ ('^[0-9a-f]{' || %s || '}$')", (s, length, s, length)
            ).fetchone()
            for s in SAMPLES
        }
        assert {s: v for s, v in verdicts.items() if v[0] != v[1]} == {}
        assert [s for s, v in verdicts.items() if v[0]] == [SHA if length == 64 else SHA[:40]]
        # NULL (no digest) passes, as a CHECK passes it.
        assert conn.execute("SELECT dlw.hex_digits_ok(NULL, %s)", (length,)).fetchone() == (None,)


def test_every_digest_constraint_and_argument_check_uses_the_rule(db: MigratedDb):
    with db.owner() as conn:
        defs = dict(
            conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = ANY (%s)",
                (list(CONSTRAINTS),),
            ).fetchall()
        )
        assert defs == CONSTRAINTS
        # No constraint or function of the schema spells a bounded hex repetition any more.
        leftovers = conn.execute(
            "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
            r" WHERE n.nspname = 'dlw' AND pg_get_constraintdef(c.oid) ~ '\[0-9a-f\]\{[0-9]+\}'"
            " UNION ALL"
            " SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            r" WHERE n.nspname = 'dlw' AND p.prosrc ~ '\[0-9a-f\]\{(40|64)\}'"
        ).fetchall()
        assert leftovers == []
    # The completion still refuses a digest that is not 64 hex digits with 22023.
    with psycopg.connect(db.app_url) as conn:
        for sha in (SHA[:63], SHA[:63] + "g", SHA + "\n"):
            with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
                as_tenant(conn, 0, "executor", user="x")
                conn.execute("SELECT * FROM dlw.executor_complete(gen_random_uuid(), gen_random_uuid(), 1, %s)", (sha,))
