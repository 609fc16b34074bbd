"""Helpers the parts of the scale bench share (bench/scale.py): timing one call inside a
rolled-back transaction, and what a call read, table by table and index by index."""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg

# Which rows of a transaction's statistics (pg_stat_xact_*) one call touched: how many rows each
# table and index gave. It explains a ratio for statements inside a function (no EXPLAIN there).
TOUCHED = """
SELECT c.relname, c.relkind,
       pg_stat_get_xact_numscans(c.oid) AS scans,
       pg_stat_get_xact_tuples_returned(c.oid) AS rows_read
  FROM pg_class c
 WHERE c.relnamespace = 'dlw'::regnamespace AND c.relkind IN ('r', 'i')
   AND (pg_stat_get_xact_numscans(c.oid) > 0 OR pg_stat_get_xact_tuples_returned(c.oid) > 0)
 ORDER BY rows_read DESC, c.relname"""


def touched(conn: psycopg.Connection) -> list[tuple[str, str, int, int]]:
    return [(r[0], "table" if r[1] == "r" else "index", int(r[2]), int(r[3])) for r in conn.execute(TOUCHED)]


def format_touched(rows: list[tuple[str, str, int, int]]) -> str:
    return "\n".join(
        f"    {kind:5} {name:36} scans {scans:>6}  rows read {read:>9,}" for name, kind, scans, read in rows
    )


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_in_rolled_back(
    conn: psycopg.Connection, context: tuple[int, str, str], query: str, args: tuple[Any, ...]
) -> float:
    """Seconds one call takes, inside BEGIN; set_context; ...; ROLLBACK (the state stays)."""
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT dlw.set_context(%s, %s, %s)", context)
        t0 = time.perf_counter()
        conn.execute(query, args).fetchall()
        return time.perf_counter() - t0


def explain_touched(conn: psycopg.Connection, context: tuple[int, str, str], query: str, args: tuple[Any, ...]) -> str:
    # The backend's pending counters may still hold earlier transactions' counts (they are
    # flushed about once a second): the difference around the one call is what it read.
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT dlw.set_context(%s, %s, %s)", context)
        before = {(name, kind): (scans, read) for name, kind, scans, read in touched(conn)}
        conn.execute(query, args).fetchall()
        after = touched(conn)
    rows = [
        (name, kind, scans - before.get((name, kind), (0, 0))[0], read - before.get((name, kind), (0, 0))[1])
        for name, kind, scans, read in after
    ]
    return format_touched(sorted((r for r in rows if r[2] or r[3]), key=lambda r: -r[3]))
