"""Every example of docs/users.md runs, in order, in one bash, against a real `dlw serve` (dev-mode
login, a tenant acme whose people are tenant operators, with a 64 MiB month) and the hub emulator
(tests/support/hub/) holding the repositories the guide names, as the DBA and reporting guides'
SQL examples run in psql (tests/psql/test_docs_sql.py).

Each ```sh block is preceded by `<!-- run: sh -->` or `<!-- run: sh; expect: TEXT -->`; TEXT must
appear in that block's output. A ```sh block without the comment fails the test: no example is
left unexecuted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.support import server
from tests.support.database import MigratedDb
from tests.support.hub import HubEmulator, running_hub
from tests.support.requirements import require
from tests.support.tenants import tenant

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "users.md"
BLOCK = re.compile(r"<!--\s*run:\s*sh\s*(?:;\s*expect:\s*(?P<expect>.*?))?\s*-->\s*\n```sh\n(?P<code>.*?)```", re.S)
MARK = "@@dlw-users-guide-block@@"


def blocks(text: str) -> list[tuple[str, str | None]]:
    return [(m["code"], m["expect"]) for m in BLOCK.finditer(text)]


QUOTA = 64 << 20  # the tenant's bytes per month: acme/huge does not fit


def guide_repositories(hub: HubEmulator) -> None:
    """What the guide's tasks name: acme/sentiment at tags v1.0 and v1.1 (the sizes the guide
    lists), and acme/huge, larger than the month's quota."""
    sentiment = hub.hub.repo("acme/sentiment")
    sentiment.tag("v1.0", sentiment.commit({"config.json": b"{}".ljust(512), "model.safetensors": bytes(1 << 20)}))
    sentiment.tag("v1.1", sentiment.commit({"config.json": b"[]".ljust(512), "README.md": b"# sentiment\n"}))
    hub.hub.repo("acme/huge").commit({"weights.bin": bytes(QUOTA + 1)})


def failed_task(db: MigratedDb, tenant_id: int) -> None:
    """What section 6 retries: a task of the tenant whose first file succeeded and second failed
    (the hub answered 503 on every attempt), as the executor functions leave one."""
    with db.owner() as conn:
        (task,) = conn.execute(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, file_count,"
            " total_bytes) SELECT %s, p.id, s.id, 'acme/flaky', 'main', 2, 2048"
            " FROM dlw.projects p, dlw.storage_targets s"
            " WHERE p.tenant_id = %s AND p.is_default AND s.tenant_id = %s AND s.name = 'default' RETURNING id",
            (tenant_id, tenant_id, tenant_id),
        ).fetchone()  # type: ignore[misc]
        for path in ("config.json", "model.safetensors"):
            conn.execute(
                "INSERT INTO dlw.task_files (tenant_id, task_id, path, size) VALUES (%s, %s, %s, 1024)",
                (tenant_id, task, path),
            )
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (task,))
        conn.execute("UPDATE dlw.task_files SET status = 'assigned', attempts = 5 WHERE task_id = %s", (task,))
        conn.execute(
            "UPDATE dlw.task_files SET status = 'succeeded' WHERE task_id = %s AND path = 'config.json'", (task,)
        )
        error = "HTTP 503 from the hub (attempt 5 of 5)"
        conn.execute(
            "UPDATE dlw.task_files SET status = 'failed', error = %s WHERE task_id = %s AND status = 'assigned'",
            (error, task),
        )
        conn.execute(
            "UPDATE dlw.tasks SET status = 'failed', error = %s WHERE id = %s", (f"model.safetensors: {error}", task)
        )


def test_every_example_is_marked_to_run():
    text = GUIDE.read_text()
    assert text.count("```sh") == len(blocks(text)) >= 8


def test_every_example_runs(db: MigratedDb):
    missing = [tool for tool in ("curl", "jq", "uuidgen") if shutil.which(tool) is None]
    require(", ".join(missing) or None, "the users guide's examples (curl, jq, uuidgen)")
    acme = tenant(db, "acme", bytes_month=QUOTA)
    failed_task(db, acme)
    rules = json.dumps([{"email_domain": "acme.test", "tenant": "acme", "role": "tenant_operator"}])
    examples = blocks(GUIDE.read_text())
    script = "set -euo pipefail\n" + "".join(f"echo {MARK}\n{code}" for code, _ in examples)
    with running_hub() as hub:
        guide_repositories(hub)
        dev = {"DLW_AUTH_DEV_MODE": "true", "DLW_AUTH_TENANT_RULES_JSON": rules, "DLW_HF_ENDPOINT": hub.url}
        with server.running_server(db, **dev) as base:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")} | {"DLW": base}
            result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    outputs = result.stdout.split(MARK + "\n")[1:]
    assert result.returncode == 0, f"block {len(outputs)} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    assert len(outputs) == len(examples)
    for n, ((code, expect), output) in enumerate(zip(examples, outputs, strict=True), 1):
        if expect:
            assert expect in output, f"block {n} ({code[:60]!r}) printed:\n{output}"
