"""dlw.create_task beyond the limits: idempotency keys, project and target lookups within the
tenant, what a created task records, the refusals, dlw.quota_current and the functions' catalog
(tests/support/admission.py drives it as the API's role).
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from app.ops.catalog_check import check_catalog
from tests.support.admission import CREATE_SQL, FILES, audit_count, concurrently, create, provision, scalar
from tests.support.tenants import as_tenant

# ------------------------------------------------------------------------------------------
# Idempotency
# ------------------------------------------------------------------------------------------


def test_50_concurrent_retries_with_one_key_create_one_task(db):
    tid = provision(db, "idem", concurrent=100)
    results = concurrently(db, [lambda c: create(c, tid, key="k-1", request_hash=b"same", lock_timeout_ms=60000)] * 50)
    assert not [r for r in results if isinstance(r, Exception)]
    assert Counter(r[0] for r in results) == {"created": 1, "existing": 49}
    assert len({r[1] for r in results}) == 1
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 1
    assert (
        scalar(db, "SELECT task_id FROM dlw.idempotency_keys WHERE tenant_id = %s AND key = 'k-1'", (tid,))
        == (results[0][1])
    )


def test_same_key_other_body_is_a_conflict_and_a_retry_survives_a_full_quota(db):
    tid = provision(db, "idem-b", concurrent=1)
    with psycopg.connect(db.app_url) as conn:
        outcome, task, _, _ = create(conn, tid, key="k", request_hash=b"one")
        assert outcome == "created"
        # the quota is full now, but a retry of the admitted request returns its task
        assert create(conn, tid, key="k", request_hash=b"one")[:2] == ("existing", task)
        assert create(conn, tid, key="k", request_hash=b"two")[:2] == ("IDEMPOTENCY_CONFLICT", None)
        assert create(conn, tid, key="other", request_hash=b"one")[0] == "QUOTA_EXCEEDED"
        # keys are per tenant: another tenant may use the same key
        other = provision(db, "idem-c", concurrent=1)
        assert create(conn, other, key="k", request_hash=b"two")[0] == "created"
        with pytest.raises(errors.NullValueNotAllowed):
            as_tenant(conn, tid, "tenant_admin", user="u")
            conn.execute(CREATE_SQL, (None, None, "r", "main", 0, Jsonb([]), "k2", None, None))
        conn.rollback()


# ------------------------------------------------------------------------------------------
# Lookups, refusals and defense in depth
# ------------------------------------------------------------------------------------------


def test_projects_and_targets_resolve_only_within_the_tenant(db):
    a = provision(db, "look-a")
    b = provision(db, "look-b")
    with db.owner() as owner:
        b_project = owner.execute("SELECT id FROM dlw.projects WHERE tenant_id = %s", (b,)).fetchone()[0]
        b_target = owner.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (b,)).fetchone()[0]
        a_target = owner.execute("SELECT id FROM dlw.storage_targets WHERE tenant_id = %s", (a,)).fetchone()[0]
        a_project = owner.execute("SELECT id FROM dlw.projects WHERE tenant_id = %s", (a,)).fetchone()[0]
        owner.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'fast')", (b,))
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, a, project=b_project)[0] == "UNKNOWN_PROJECT"
        assert create(conn, a, project=uuid.uuid4())[0] == "UNKNOWN_PROJECT"
        assert create(conn, a, target=str(b_target))[0] == "UNKNOWN_STORAGE_TARGET"
        assert create(conn, a, target="fast")[0] == "UNKNOWN_STORAGE_TARGET"
        assert create(conn, a, target="no-such")[0] == "UNKNOWN_STORAGE_TARGET"
        for project, target in ((None, "default"), (a_project, str(a_target)), (None, None)):
            outcome, task, _, _ = create(conn, a, project=project, target=target)
            assert outcome == "created"
            with db.owner() as owner:
                assert owner.execute(
                    "SELECT project_id, storage_target_id FROM dlw.tasks WHERE id = %s", (task,)
                ).fetchone() == (a_project, a_target)
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (b,)) == 0


def test_created_task_and_files_carry_the_request(db):
    tid = provision(db, "shape")
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_admin", user="user-42")
        outcome, task, metric, detail = conn.execute(
            CREATE_SQL, (None, "default", "org/m", "v1", 7, Jsonb(FILES), None, None, None)
        ).fetchone()
        conn.commit()
    assert (outcome, metric) == ("created", None)
    with db.owner() as owner:
        project, target, created_at = owner.execute(
            "SELECT project_id, storage_target_id, created_at FROM dlw.tasks WHERE id = %s", (task,)
        ).fetchone()
    assert detail == {
        "project_id": str(project),
        "storage_target_id": str(target),
        "file_count": 2,
        "total_bytes": 100,
        "created_at": detail["created_at"],
    }
    assert datetime.fromisoformat(detail["created_at"]) == created_at
    with db.owner() as owner:
        assert owner.execute(
            "SELECT status, repo_id, revision, priority, file_count, total_bytes, created_by, finished_at"
            " FROM dlw.tasks WHERE id = %s",
            (task,),
        ).fetchone() == ("pending", "org/m", "v1", 7, 2, 100, "user-42", None)
        assert owner.execute(
            "SELECT path, size, sha256, status, priority FROM dlw.task_files WHERE task_id = %s ORDER BY path",
            (task,),
        ).fetchall() == [
            ("config.json", 10, None, "pending", 7),
            ("model.safetensors", 90, "ab" * 32, "pending", 7),
        ]
        assert owner.execute(
            "SELECT actor, detail ->> 'total_bytes' FROM dlw.audit_log WHERE action = 'task.created' AND target = %s",
            (str(task),),
        ).fetchone() == ("user-42", "100")


def test_a_duplicate_path_fails_whole_and_creates_nothing(db):
    tid = provision(db, "dup")
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.UniqueViolation):
        create(conn, tid, files=[{"path": "a", "size": 1}, {"path": "a", "size": 2}])
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0


def test_a_viewer_is_refused_by_row_level_security(db):
    tid = provision(db, "viewer")
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        create(conn, tid, role="tenant_viewer")
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0
    assert audit_count(db, tid, "quota.exceeded") == 0


def test_without_context_create_is_refused(db):
    with psycopg.connect(db.app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(CREATE_SQL, (None, None, "r", "main", 0, Jsonb([]), None, None, None))


def test_an_inactive_tenant_creates_nothing(db):
    tid = provision(db, "sleepy")
    with db.owner() as owner:
        owner.execute("UPDATE dlw.tenants SET active = false WHERE tenant_id = %s", (tid,))
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "TENANT_INACTIVE"
    assert scalar(db, "SELECT count(*) FROM dlw.tasks WHERE tenant_id = %s", (tid,)) == 0


def test_admission_refuses_to_run_above_read_committed(db):
    tid = provision(db, "isolation")
    with psycopg.connect(db.app_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(errors.InvalidTransactionState):
            create(conn, tid)


def test_quota_current_reports_limits_and_exact_usage(db):
    tid = provision(db, "gauge", concurrent=4, bytes_month=5000)
    with psycopg.connect(db.app_url) as conn:
        for _ in range(3):
            create(conn, tid)
        as_tenant(conn, tid, "tenant_viewer", user="user-1")
        row = conn.execute("SELECT * FROM dlw.quota_current()").fetchone()
        names = [d.name for d in conn.execute("SELECT * FROM dlw.quota_current()").description]
    got = dict(zip(names, row, strict=True))
    assert got["tenant_id"] == tid
    assert (got["bytes_used_month"], got["bytes_quota_month"]) == (0, 5000)
    assert (got["storage_gb_used"], got["storage_gb_quota"]) == (0, 100)
    assert (got["concurrent_tasks"], got["concurrent_quota"]) == (3, 4)
    assert set(names) >= {"period", "snapshot_refreshed_at", "snapshot_age_seconds"}
    with psycopg.connect(db.app_url) as conn:
        assert conn.execute("SELECT * FROM dlw.quota_current()").fetchall() == []  # no context, no row


def test_functions_are_commented_invoker_rights_and_executable_by_the_app_only(db):
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT p.oid::regprocedure::text, p.prosecdef, obj_description(p.oid, 'pg_proc') IS NOT NULL,
                   has_function_privilege('dlw_app', p.oid, 'EXECUTE'),
                   has_function_privilege('dlw_reporting', p.oid, 'EXECUTE'),
                   p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                               WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'dlw' AND p.proname IN ('create_task', 'cancel_task', 'quota_current',
                  'month_start', 'bytes_used_month', 'task_status_guard', 'task_file_status_guard',
                  'initial_status_guard')""").fetchall()
    assert len(rows) == 8
    for name, definer, commented, app_exec, reporting_exec, public_exec in rows:
        assert not definer, name
        assert commented, name
        assert not reporting_exec, name
        assert not public_exec, name
        if "guard" not in name:
            assert app_exec, name
    assert check_catalog(db.owner_url) == []


def test_refusals_for_ever_new_repo_ids_still_leave_one_audit_row(db):
    """A caller over quota who varies repo_id on every request gets no row per request: quota
    refusals repeat per (actor, metric, minute), the repo only in the first one's detail."""
    tid = provision(db, "repo-flood", concurrent=1)
    with psycopg.connect(db.app_url) as conn:
        assert create(conn, tid)[0] == "created"
        outcomes = {create(conn, tid, repo=f"org/flood-{i}")[0] for i in range(50)}
    assert outcomes == {"QUOTA_EXCEEDED"}
    rows = scalar(db, "SELECT count(*) FROM dlw.audit_log WHERE tenant_id = %s AND action = 'quota.exceeded'", (tid,))
    assert (rows, audit_count(db, tid, "quota.exceeded")) in ((1, 50), (2, 50))  # 2: the flood crossed a minute
