"""The lock order of dlw.storage_record_set (sql/23_stored_blobs.sql): two completion batches
registering the same contents take the registry rows in (tenant, target, sha256) order, whatever
order their arrays give, so neither holds one content while it waits for another the other holds."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.sql.test_snapshot_lock_order import wait_for_lock
from tests.sql.test_storage_record_set import owner, record_set, registry, sha, target_of
from tests.sql.test_task_deletions import provision
from tests.support.database import MigratedDb

__all__ = ["owner"]  # the executor tests' module fixture, shared


def test_two_sets_of_the_same_contents_in_opposite_orders_never_deadlock(db: MigratedDb, owner: Any) -> None:
    """Content a is registered; b is new. A third transaction holds a's row. Batch one gives
    (a, b) and queues behind it for a; batch two gives (b, a). Taken in the arrays' order, batch
    two would insert b and then queue for a; once the holder ends, batch one takes a and waits for
    b, which batch two holds while it waits for a: a deadlock, which PostgreSQL breaks by failing
    one of them after deadlock_timeout. In sha256 order both wait for a first, holding nothing."""
    tid = provision(db, "record-order")
    target = target_of(owner, tid)
    a, b = sorted([sha("order-a"), sha("order-b")])
    record_set(owner, [(tid, target, a, 1, "a")])
    owner.commit()
    outcome: dict[str, Any] = {}

    def run(key: str, conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> None:
        try:
            conn.execute("SET ROLE dlw_system")
            row = conn.execute(
                "SELECT dlw.storage_record_set(%s::bigint[], %s::uuid[], %s::text[], %s::bigint[], %s::text[]) AS n",
                tuple(list(column) for column in zip(*rows, strict=True)),
            ).fetchone()
            conn.commit()
            outcome[key] = row["n"] if row else None
        except psycopg.Error as exc:  # a deadlock: 40P01
            outcome[key] = exc

    with (
        psycopg.connect(db.owner_url, row_factory=dict_row) as holder,
        psycopg.connect(db.owner_url, row_factory=dict_row) as one,
        psycopg.connect(db.owner_url, row_factory=dict_row) as two,
    ):
        for conn in (one, two):
            conn.execute("SET deadlock_timeout = '100ms'")  # a cycle would fail within the test
        holder.execute("SELECT 1 FROM dlw.stored_blobs WHERE tenant_id = %s AND sha256 = %s FOR UPDATE", (tid, a))
        first = threading.Thread(target=run, args=("one", one, [(tid, target, a, 1, "a"), (tid, target, b, 2, "b")]))
        first.start()
        wait_for_lock(owner, one.info.backend_pid)
        second = threading.Thread(target=run, args=("two", two, [(tid, target, b, 2, "b2"), (tid, target, a, 1, "a2")]))
        second.start()
        wait_for_lock(owner, two.info.backend_pid)
        holder.commit()
        first.join(30)
        second.join(30)
    assert outcome == {"one": 1, "two": 0}, outcome  # b is new once; nobody failed
    assert registry(owner, tid) == {a: (1, "a"), b: (2, "b")}
