"""`./run` in a fresh copy of the checkout: concurrent calls set the environment up once and both
work; an interpreter reached through a shim whose path changes (pyenv) keeps the environment."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked files (as they are now), without .venv, .tools or node_modules."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def shim(directory: Path) -> Path:
    """A pyenv-like shim: a script at its own path that execs the real interpreter."""
    directory.mkdir(parents=True)
    path = directory / "python3"
    path.write_text(f'#!/bin/sh\nexec "{os.path.realpath(sys.executable)}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run(clone: Path, *args: str, python: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLW_", "VIRTUAL_ENV", "UV_"))}
    env["PYTHON"] = str(python)
    return subprocess.Popen(
        ["./run", *args], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_concurrent_calls_in_a_fresh_clone_and_a_moving_shim(tmp_path: Path):
    clone = fresh_copy(tmp_path / "clone")
    python = shim(tmp_path / "first-shim")
    first, second = run(clone, "dlw", "--help", python=python), run(clone, "dlw", "--help", python=python)
    for proc in (first, second):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "usage: dlw" in out
    stamp = (clone / ".venv/.dlw-synced").read_text()
    marker = clone / ".venv/marker"
    marker.write_text("the environment was kept")
    for n in range(2):  # each call through a shim at a new path, as pyenv's would be on another machine
        proc = run(clone, "dlw", "--help", python=shim(tmp_path / f"shim{n}"))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage: dlw" in out, err
    assert marker.exists(), "./run recreated .venv"
    assert (clone / ".venv/.dlw-synced").read_text() == stamp
