"""Every example of docs/users.md runs, in order, in one bash, against a real `dlw serve` (dev-mode
login, a tenant acme whose people are tenant operators), as the DBA and reporting guides' SQL
examples run in psql (tests/psql/test_docs_sql.py).

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
from tests.support.requirements import require
from tests.support.tenants import tenant

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "users.md"
BLOCK = re.compile(r"<!--\s*run:\s*sh\s*(?:;\s*expect:\s*(?P<expect>.*?))?\s*-->\s*\n```sh\n(?P<code>.*?)```", re.S)
MARK = "@@dlw-users-guide-block@@"


def blocks(text: str) -> list[tuple[str, str | None]]:
    return [(m["code"], m["expect"]) for m in BLOCK.finditer(text)]


def test_every_example_is_marked_to_run():
    text = GUIDE.read_text()
    assert text.count("```sh") == len(blocks(text)) >= 8


def test_every_example_runs(db: MigratedDb):
    missing = [tool for tool in ("curl", "jq", "uuidgen") if shutil.which(tool) is None]
    require(", ".join(missing) or None, "the users guide's examples (curl, jq, uuidgen)")
    tenant(db, "acme")
    rules = json.dumps([{"email_domain": "acme.test", "tenant": "acme", "role": "tenant_operator"}])
    examples = blocks(GUIDE.read_text())
    script = "set -euo pipefail\n" + "".join(f"echo {MARK}\n{code}" for code, _ in examples)
    with server.running_server(db, DLW_AUTH_DEV_MODE="true", DLW_AUTH_TENANT_RULES_JSON=rules) as base:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")} | {"DLW": base}
        result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    outputs = result.stdout.split(MARK + "\n")[1:]
    assert result.returncode == 0, f"block {len(outputs)} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    assert len(outputs) == len(examples)
    for n, ((code, expect), output) in enumerate(zip(examples, outputs, strict=True), 1):
        if expect:
            assert expect in output, f"block {n} ({code[:60]!r}) printed:\n{output}"
