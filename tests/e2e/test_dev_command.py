"""`dlw dev`: the README's run command, as a real process, on the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg

from app.ops.embedded import LocalCluster
from tests.support import server
from tests.support.database import free_port

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_second_dev_on_the_same_data_directory_or_port_refuses_at_once(tmp_path: Path):
    data_dir, port = tmp_path / "devdata", free_port()
    cluster = LocalCluster(data_dir / "pgdata")
    first = start_dev(data_dir, port)
    try:
        server.wait_ready(first, port, timeout=90)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLW_")}
        # The README's own command, `./run dev`, a second time on the same data directory.
        same_dir = subprocess.run(
            [str(ROOT / "run"), "dev", "--data-dir", str(data_dir), "--port", str(free_port())],
            capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert same_dir.returncode == 1 and "Traceback" not in same_dir.stderr, same_dir.stderr
        assert f"in use by another dlw dev (pid {first.pid})" in same_dir.stderr
        other_dir = tmp_path / "other"
        same_port = subprocess.run(
            [sys.executable, "-m", "app", "dev", "--data-dir", str(other_dir), "--port", str(port)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert same_port.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in same_port.stderr
        assert not other_dir.exists(), "the port is checked before anything is touched"
        # The first one is unharmed: its PostgreSQL runs and it still serves.
        assert cluster.running()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        output = stop(first)
    assert "run an executor" in output and "dlw executor run --base-url" in output
    assert not cluster.running()


def test_dev_never_stops_a_cluster_it_did_not_start(tmp_path: Path):
    data_dir, port = tmp_path / "devdata", free_port()
    cluster = LocalCluster(data_dir / "pgdata")
    cluster.start()  # someone else's (e.g. a dev run with --keep-db-running)
    try:
        proc = start_dev(data_dir, port)
        try:
            server.wait_ready(proc, port, timeout=90)
            assert cluster.running()
        finally:
            output = stop(proc)
        assert "not started by us" in output
        assert cluster.running(), output
    finally:
        cluster.stop()
