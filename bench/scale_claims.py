"""The claim part of the scale bench (bench/scale.py): the executor queue loaded at two sizes, and
dlw.executor_claim of 1, 10 and 100 files timed at both, side by side.

What each measured claim reads of the queue summary's change rows (executor_queue_changes): a
claim runs in a transaction that is rolled back, so the change rows its own file updates append
are left behind as aborted rows, and the next claim's fold (dlw.executor_queue_try_fold) reads
them once through the index (then they are marked dead in it). Each measured claim therefore
reads the change rows of the claim before it (1 tenant's for a 1-file claim), at both sizes: the
work of folding a committed claim's changes, which is the design. The bulk load leaves none
(dlw.executor_queue_rebuild() recounts the summary; the refresh in load_history folds the rest),
and the rows-read listing printed above target is taken after a warm-up claim of the same size,
so it shows what a measured claim read (not what the claims of another size left).

Rows read do not explain the 1-file claim's ratio: every relation gives at most 2 rows at both
sizes. What grew with the tables was planning: with plan_cache_mode auto, some of the claim's
statements were planned again with their values on every call, which costs more the larger the
tables (sql/41_executor_claim.sql now keeps the cached generic plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from bench.scale_common import explain_touched, median_ms, time_in_rolled_back

CLAIM_MAX = 2.0


@dataclass(frozen=True)
class Queue:
    tenants: int
    pending: int
    in_flight: int

    @property
    def label(self) -> str:
        return f"{self.tenants:,} t / {self.pending:,} p / {self.in_flight:,} f"


def load_queue(conn: psycopg.Connection, q: Queue) -> None:
    """q.tenants tenants, each with one running task holding pending/tenants pending files and
    in_flight/tenants assigned ones (leases for an hour: nothing expires while measuring). The
    tasks are already running, so a claim starts none: what is measured is the fairness step,
    the sweep and the files' own work."""
    conn.execute(
        "SELECT count(dlw.provision_tenant(format('s%%s', g), 'scale', 0, 0, 0)) FROM generate_series(1, %s) g",
        (q.tenants,),
    )
    conn.execute("SET session_replication_role = replica")
    conn.execute("SET work_mem = '256MB'")
    conn.execute(
        """
        INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, status, file_count,
                               total_bytes, created_by)
        SELECT t.tenant_id, p.id, s.id, 'bench/scale', 'main', 'running', %(per)s, %(per)s, 'bench'
          FROM dlw.tenants t
          JOIN dlw.projects p ON p.tenant_id = t.tenant_id AND p.is_default
          JOIN dlw.storage_targets s ON s.tenant_id = t.tenant_id AND s.name = 'default'
         WHERE t.slug ~ '^s[0-9]+$'
        """,
        {"per": (q.pending + q.in_flight) // q.tenants},
    )
    conn.execute(
        """
        INSERT INTO dlw.task_files (tenant_id, task_id, path, size, status, attempts, assignment_token,
                                    lease_seconds, lease_expires_at, executor_id, created_at)
        SELECT x.tenant_id, x.id, 'f' || g, 1,
               CASE WHEN g <= %(pending)s THEN 'pending' ELSE 'assigned' END,
               CASE WHEN g <= %(pending)s THEN 0 ELSE 1 END,
               CASE WHEN g > %(pending)s THEN gen_random_uuid() END,
               CASE WHEN g > %(pending)s THEN 3600 END,
               CASE WHEN g > %(pending)s THEN now() + interval '1 hour' + g * interval '1 ms' END,
               CASE WHEN g > %(pending)s THEN 'bench' END,
               now() - interval '1 day' + g * interval '1 ms'
          FROM dlw.tasks x CROSS JOIN generate_series(1, %(pending)s + %(in_flight)s) g
         WHERE x.repo_id = 'bench/scale'
        """,
        {"pending": q.pending // q.tenants, "in_flight": q.in_flight // q.tenants},
    )
    conn.execute("RESET session_replication_role")
    conn.execute("SELECT dlw.executor_queue_rebuild()")


CLAIM = "SELECT file_id FROM dlw.executor_claim(%s, 3600, 'bench')"
EXECUTOR = (0, "bench-executor", "executor")


def measure_claims(small: psycopg.Connection, large: psycopg.Connection, reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 10, 100):
        samples: dict[str, list[float]] = {"small": [], "large": []}
        for i in range(reps + 3):
            order = (("small", small), ("large", large)) if i % 2 else (("large", large), ("small", small))
            for key, conn in order:
                t = time_in_rolled_back(conn, EXECUTOR, CLAIM, (n,))
                if i >= 3:  # warm-up
                    samples[key].append(t)
        s, g = median_ms(samples["small"]), median_ms(samples["large"])
        rows.append(
            {
                "measure": f"claim {n} file(s)",
                "small_ms": s,
                "large_ms": g,
                "ratio": g / s,
                "target": CLAIM_MAX,
                "explain": lambda n=n: f"  small:\n{explain_claim(small, n)}\n  large:\n{explain_claim(large, n)}",
            }
        )
    return rows


def explain_claim(conn: psycopg.Connection, n: int) -> str:
    """What one measured claim of n files read: a first claim of the same size leaves the change
    rows a measured claim finds (see the module's docstring), then the second one is listed."""
    time_in_rolled_back(conn, EXECUTOR, CLAIM, (n,))
    return explain_touched(conn, EXECUTOR, CLAIM, (n,))
