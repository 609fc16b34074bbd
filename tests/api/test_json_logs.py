"""DLW_LOG_FORMAT=json on a real `dlw serve`: every stderr line is one JSON object; the access
line carries the request id (the caller's, or a new one; echoed either way), route template,
status, duration, tenant and principal ids; no token, secret or idempotency key ever appears."""

from __future__ import annotations

import json
import subprocess
import uuid

import httpx

from tests.support import server
from tests.support.app import ADMIN_TOKEN, SECRET, token
from tests.support.database import MigratedDb, free_port
from tests.support.tenants import UNLIMITED, tenant


def test_json_lines_with_request_fields_and_no_secrets(db: MigratedDb):
    tid = tenant(db, "jsonlogs", **UNLIMITED)
    user_token = token(tid, "tenant_operator", "alice@jsonlogs.test")
    idempotency_key = f"idem-{uuid.uuid4()}"
    port = free_port()
    env = server.serve_env(db, DLW_LOG_FORMAT="json", DLW_SYSTEM_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = server.start(env, port, stdout=subprocess.PIPE)
    try:
        server.wait_ready(proc, port)
        base = f"http://127.0.0.1:{port}"
        created = httpx.post(
            f"{base}/api/v1/tasks",
            headers={
                "Authorization": f"Bearer {user_token}",
                "X-Request-ID": "trace-abc.123",
                "Idempotency-Key": idempotency_key,
            },
            json={"repo_id": "org/m", "revision": "v1", "files": [{"path": "a", "size": 1}]},
        )
        assert created.status_code == 201, created.text
        assert created.headers["X-Request-ID"] == "trace-abc.123"
        hostile = httpx.get(f"{base}/healthz", headers={"X-Request-ID": 'x"\\n{"level": "forged"}'})
        generated = hostile.headers["X-Request-ID"]
        assert generated != 'x"\\n{"level": "forged"}' and len(generated) == 32
        denied = httpx.get(f"{base}/api/v1/tasks", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"})
        assert denied.status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    # Every line of both streams parses; the access lines are on stdout (as uvicorn's were).
    lines = [json.loads(line) for line in (err + out).splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines), "uvicorn's own lines are JSON too"
    access = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert access and all(line["logger"] == "dlw.access" for line in access)
    post = next(line for line in access if line["request_id"] == "trace-abc.123")
    assert post["method"] == "POST" and post["route"] == "/api/v1/tasks" and post["status"] == 201
    assert post["tenant_id"] == tid and post["principal_id"] == "alice@jsonlogs.test"
    assert isinstance(post["duration_ms"], float)
    health = next(line for line in access if line["request_id"] == generated)
    assert health["route"] == "/healthz" and health["tenant_id"] is None
    assert any(line["status"] == 401 and line["route"] == "/api/v1/tasks" for line in access)
    for secret in (user_token, SECRET, ADMIN_TOKEN, idempotency_key, db.server.app_password):
        assert secret not in err + out
