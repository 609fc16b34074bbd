"""The real psql client for tests: run a script as some login and read its output and SQLSTATEs."""

from __future__ import annotations

import os
import re
import subprocess

PSQL = "/usr/bin/psql"
ERROR = re.compile(r"ERROR:  ([0-9A-Z]{5}): ")


def psql(
    url: str, script: str, *, stop: bool = True, unaligned: bool = True, merge: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a script through /usr/bin/psql (stdin), errors with their SQLSTATE (VERBOSITY=verbose).
    stop: ON_ERROR_STOP (exit code 3 on the first error); merge: stderr into stdout, in order."""
    args = [PSQL, "-X", "-q", "-v", f"ON_ERROR_STOP={int(stop)}", "-v", "VERBOSITY=verbose", "-d", url, "-f", "-"]
    if unaligned:
        args[1:1] = ["-A", "-t", "-F", "|"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return subprocess.run(
        args,
        input=script,
        text=True,
        env=env,
        timeout=120,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
    )


def ok(url: str, script: str, **kw: bool) -> str:
    """stdout of a script that must succeed."""
    result = psql(url, script, **kw)
    assert result.returncode == 0, f"psql failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def sqlstates(output: str) -> list[str]:
    return ERROR.findall(output)


def lit(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
