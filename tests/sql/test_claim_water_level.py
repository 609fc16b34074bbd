"""The claim's fair shares from a bounded number of turns (sql/41_executor_claim.sql, the
`levelled` step): each candidate tenant gets ranks only up to the water level when the
candidates' pending files reach it p_max_files times. This must choose exactly what giving every
candidate up to p_max_files ranks chose (max-min fairness, ties by last served, then tenant id):
both formulations are run over the same random candidate sets and compared, the bounded one as
the function's own text."""

from __future__ import annotations

import random
import re

import psycopg

from tests.support.database import MigratedDb

# The formulation before the water level: every candidate gets up to p_max_files ranks.
REFERENCE = """
    chosen AS (
        SELECT c.tenant_id
          FROM candidates c
         CROSS JOIN LATERAL generate_series(1, least(c.pending, p_max_files)::integer) AS g(rank)
         ORDER BY c.in_flight + g.rank, c.served_at NULLS FIRST, c.tenant_id
         LIMIT p_max_files
    )"""


def claim_steps(conn: psycopg.Connection) -> str:
    src = conn.execute(
        "SELECT prosrc FROM pg_proc WHERE oid = 'dlw.executor_claim(integer, integer, text, integer)'::regprocedure"
    ).fetchone()[0]
    found = re.search(r"(levelled AS \(.*?\), chosen AS \(.*?\n    \)), shares AS", src, re.S)
    assert found is not None, "the claim's levelled and chosen steps were not found"
    return found.group(1)


Candidate = tuple[int, int, int, int | None]  # tenant_id, pending, in_flight, served seconds ago


def served_at(seconds_ago: int | None) -> str:
    return "NULL" if seconds_ago is None else f"now() - interval '{seconds_ago} s'"


def over(conn: psycopg.Connection, steps: str, candidates: list[Candidate], n: int, select: str) -> list:
    """`select` over the steps, the candidates given as the claim's candidates CTE, p_max_files n."""
    values = ", ".join(f"({t}::bigint, {p}::bigint, {f}::bigint, {served_at(s)})" for t, p, f, s in candidates)
    query = f"WITH candidates (tenant_id, pending, in_flight, served_at) AS (VALUES {values}), {steps} {select}"
    return conn.execute(re.sub(r"\bp_max_files\b", str(n), query)).fetchall()


def shares(conn: psycopg.Connection, steps: str, candidates: list[Candidate], n: int) -> list:
    return over(conn, steps, candidates, n, "SELECT tenant_id, count(*) FROM chosen GROUP BY tenant_id ORDER BY 1")


def test_the_water_level_chooses_what_every_rank_chose(db: MigratedDb):
    rng = random.Random(16)
    with psycopg.connect(db.owner_url) as conn:
        bounded = claim_steps(conn)
        levelled_rows = 0
        for case in range(400):
            n = rng.choice([1, 2, 3, 5, 10, 37, 100])
            spread = rng.choice([0, 1, 3, 50])  # equal in-flight counts, or near, or far apart
            few = rng.random() < 0.3  # tenants with a file or two pending: the level may not be reached
            candidates = [
                (
                    t,
                    rng.randint(1, 3) if few and rng.random() < 0.8 else rng.randint(1, 300),
                    rng.randint(0, spread),
                    None if rng.random() < 0.2 else rng.randint(0, 3),  # ties in last served too
                )
                for t in rng.sample(range(1, 10_000), rng.randint(1, n))
            ]
            got, want = shares(conn, bounded, candidates, n), shares(conn, REFERENCE, candidates, n)
            assert got == want, (case, n, candidates)
            levelled_rows += sum(c for _, c in got)
        assert levelled_rows > 1000  # the cases chose files, not nothing


def test_equal_in_flight_counts_list_about_max_files_turns(db: MigratedDb):
    """The point of the level: N tenants with the same files in flight and enough pending list
    at most p_max_files + N turns, not N x p_max_files."""
    with psycopg.connect(db.owner_url) as conn:
        bounded = claim_steps(conn)
        for n, tenants in ((100, 100), (100, 10), (10, 3), (1, 1)):
            candidates: list[Candidate] = [(t, 1_000, 7, t % 3) for t in range(1, tenants + 1)]
            ((listed,),) = over(conn, bounded, candidates, n, "SELECT sum(ranks) FROM levelled")
            assert listed <= n + tenants, (n, tenants, listed)
