"""`dlw dev`: the README's run command, as a real process, on the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from app.ops.embedded import LocalCluster
from tests.support import server
from tests.support.database import free_port


def start_dev(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")}
    return subprocess.Popen(
        [sys.executable, "-m", "app", "dev", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def test_dev_serves_as_dlw_app_and_keeps_its_data_across_restarts(tmp_path: Path):
    data_dir, port = tmp_path / "devdata", free_port()
    cluster = LocalCluster(data_dir / "pgdata")
    proc = start_dev(data_dir, port)
    try:
        server.wait_ready(proc, port, timeout=90)
        with psycopg.connect(cluster.url("dlw"), autocommit=True) as conn:
            slugs = {r[0] for r in conn.execute("SELECT slug FROM dlw.tenants")}
            assert {"default", "acme", "globex"} <= slugs
            users = {
                r[0] for r in conn.execute("SELECT usename FROM pg_stat_activity WHERE application_name = 'dlw-api'")
            }
            assert users == {"dlw_app"}
            conn.execute("SELECT dlw.provision_tenant('marker', 'Survives a restart')")
    finally:
        output = stop(proc)
    assert "dlw dev: API on" in output
    assert not cluster.running(), "dlw dev stops its embedded PostgreSQL on exit"

    proc = start_dev(data_dir, port)
    try:
        server.wait_ready(proc, port, timeout=90)
        with psycopg.connect(cluster.url("dlw"), autocommit=True) as conn:
            assert conn.execute("SELECT 1 FROM dlw.tenants WHERE slug = 'marker'").fetchone()
    finally:
        stop(proc)
        cluster.destroy()
