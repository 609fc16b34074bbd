"""The `dlw` dispatcher and the tools' configuration, without a database: every command
resolves, the executor stands apart from the server's settings, named queries load."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import LazyCommand, build_parser
from app.db.queries import parse
from app.executor.runner import QUEUE_MAX, ReferenceExecutor
from app.executor.settings import Config, add_run_arguments, config_from
from app.ops.queries import QUERY_FILE, query

ROOT = Path(__file__).resolve().parents[2]


def commands(parser: argparse.ArgumentParser) -> Iterator[object]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from commands(child)
    if parser.get_default("func") is not None:
        yield parser.get_default("func")


def test_every_command_resolves_to_a_function():
    found = list(commands(build_parser()))
    assert len(found) >= 12
    for func in found:
        if isinstance(func, LazyCommand):
            assert callable(func.resolve()), func


def test_the_executor_loads_without_the_server_settings_or_the_api():
    code = (
        "import sys, app.executor.runner;"
        "bad = [m for m in sys.modules if m == 'app.config' or m.startswith(('app.api', 'app.db', 'fastapi'))];"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def executor_config(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> Config | list[str]:
    for name in [n for n in os.environ if n.startswith(("DLW_EXECUTOR_", "DLW_HF_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return config_from(parser.parse_args(list(argv)))


def test_executor_flags_override_the_environment_which_overrides_the_defaults(monkeypatch: pytest.MonkeyPatch):
    env = {"DLW_EXECUTOR_TOKEN": "t", "DLW_EXECUTOR_STORAGE": "/s", "DLW_HF_TOKEN": "hf"}
    config = executor_config(monkeypatch, env)
    assert isinstance(config, Config)
    assert (config.base_url, config.hf_endpoint, config.concurrency, config.lease_seconds, config.poll_seconds) == (
        "http://127.0.0.1:8000",
        "https://huggingface.co",
        2,
        60,
        2.0,
    )
    assert config.token == "t" and str(config.storage) == "/s" and config.hf_token == "hf"
    assert re.fullmatch(r".+-\d+", config.label)
    env |= {"DLW_EXECUTOR_CONCURRENCY": "5", "DLW_HF_ENDPOINT": "http://hub", "DLW_EXECUTOR_LABEL": "env-label"}
    config = executor_config(monkeypatch, env, "--concurrency", "3", "--token", "flag")
    assert isinstance(config, Config)
    assert (config.concurrency, config.token, config.hf_endpoint) == (3, "flag", "http://hub")
    assert config.label == "env-label"


def test_executor_configuration_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch):
    problems = executor_config(monkeypatch, {}, "--lease-seconds", "4")
    assert problems == [
        "no executor token: pass --token or set DLW_EXECUTOR_TOKEN",
        "no storage directory: pass --storage or set DLW_EXECUTOR_STORAGE",
        "--concurrency must be >= 1, --lease-seconds 5..3600, --poll-seconds > 0",
    ]
    bad = executor_config(monkeypatch, {"DLW_EXECUTOR_CONCURRENCY": "many"})
    assert isinstance(bad, list) and "concurrency" in bad[0]


def test_small_files_are_claimed_by_bytes_up_to_the_queue_limit(monkeypatch: pytest.MonkeyPatch):
    env = {"DLW_EXECUTOR_TOKEN": "t", "DLW_EXECUTOR_STORAGE": "/s"}
    config = executor_config(monkeypatch, env, "--prefetch", "8", "--prefetch-bytes", str(1 << 20))
    assert isinstance(config, Config) and (config.prefetch, config.prefetch_bytes) == (8, 1 << 20)
    assert executor_config(monkeypatch, env, "--prefetch-bytes", "-1") == ["--prefetch-bytes must be >= 0"]
    executor = ReferenceExecutor(config, progress="off")
    assert executor._queue_target() == 8  # nothing claimed yet: the file count alone
    for typical, held in [(2048, QUEUE_MAX), (8192, 128), (1 << 20, 8), (1 << 30, 8)]:
        executor._typical_size = typical  # the last claim's mean declared size
        assert executor._queue_target() == held, typical
    executor = ReferenceExecutor(dataclasses.replace(config, prefetch_bytes=0), progress="off")
    executor._typical_size = 1
    assert executor._queue_target() == 8


def test_named_queries_load_and_every_name_used_exists():
    names = parse(QUERY_FILE.read_text())
    assert all(sql and not sql.startswith("--") for sql in names.values())
    used = set()
    for path in (ROOT / "app").rglob("*.py"):
        used |= set(re.findall(r'query\("(\w+)"\)', path.read_text()))
        used |= set(re.findall(r'_call\(\s*args,\s*"(\w+)"', path.read_text()))
    assert used and used <= set(names), used - set(names)
    assert query("resolve_tenant").startswith("SELECT")
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
