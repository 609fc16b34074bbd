"""The executor's own configuration: command-line flags over DLW_EXECUTOR_* variables over
defaults. It is a separate program from the API, so it reads none of the server's settings."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.domain import CLAIM_MAX_FILES, LEASE_SECONDS_MAX, LEASE_SECONDS_MIN

PREFETCH_BYTES = 64 << 20
CONNECTIONS_PER_FILE = 4  # ranged connections per large file unless --connections-per-file says otherwise
MAX_CONNECTIONS = 8  # extra ranged connections in all (each file's first runs anyway), and the lane's


class ExecutorSettings(BaseSettings):
    """The environment: DLW_EXECUTOR_<FIELD>, except the file endpoint's DLW_HF_* names."""

    model_config = SettingsConfigDict(env_prefix="DLW_EXECUTOR_", extra="ignore", populate_by_name=True)

    base_url: str = "http://127.0.0.1:8000"
    token: str | None = None
    storage: str | None = None
    hf_endpoint: str = Field(
        default="https://huggingface.co", validation_alias=AliasChoices("DLW_HF_ENDPOINT", "hf_endpoint")
    )
    hf_token: str | None = Field(default=None, validation_alias=AliasChoices("DLW_HF_TOKEN", "hf_token"))
    concurrency: int = 2
    lease_seconds: int = 60
    poll_seconds: float = 2.0
    progress_seconds: float = 2.0
    connections_per_file: int = CONNECTIONS_PER_FILE
    max_connections: int = MAX_CONNECTIONS
    prefetch: int | None = None
    prefetch_bytes: int = PREFETCH_BYTES
    label: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


def _default_label() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Config:
    """What one executor run works with, validated."""

    base_url: str
    token: str
    storage: Path  # the first --storage root: default targets' files go under <storage>/<tenant>/
    hf_endpoint: str
    hf_token: str | None = None
    concurrency: int = 2
    lease_seconds: int = 60
    poll_seconds: float = 2.0
    progress_seconds: float = 2.0
    connections_per_file: int = CONNECTIONS_PER_FILE
    max_connections: int = MAX_CONNECTIONS
    prefetch: int = 8
    prefetch_bytes: int = PREFETCH_BYTES  # small files: hold more than `prefetch` while they fit (runner.py)
    label: str = field(default_factory=_default_label)
    metrics_port: int | None = None  # Prometheus metrics on metrics_host:metrics_port (app/executor/metrics.py)
    metrics_host: str = "127.0.0.1"
    more_storage: tuple[Path, ...] = ()  # further roots that targets' roots may be in (docs/storage.md)

    @property
    def storages(self) -> tuple[Path, ...]:
        """Every root this executor serves, the default first."""
        return (self.storage, *self.more_storage)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    # Numeric defaults are None here so that an unset flag falls back to the environment.
    parser.add_argument("--base-url", help="the DLW API (default: DLW_EXECUTOR_BASE_URL)")
    parser.add_argument("--token", help="executor token (default: DLW_EXECUTOR_TOKEN; prefer the variable)")
    parser.add_argument(
        "--storage",
        action="append",
        help="a storage root this executor serves; repeat for several (the first also holds default targets;"
        " default: DLW_EXECUTOR_STORAGE, several separated by ':')",
    )
    parser.add_argument("--hf-endpoint", help="Hugging Face-compatible file endpoint (default: DLW_HF_ENDPOINT)")
    parser.add_argument("--concurrency", type=int, help="files downloaded at once (default 2)")
    parser.add_argument("--lease-seconds", type=int, help="lease asked for each file (default 60)")
    parser.add_argument("--poll-seconds", type=float, help="wait when the queue is empty (default 2)")
    parser.add_argument(
        "--progress-seconds", type=float, help="heartbeat (progress, resume point) at least this often (default 2)"
    )
    parser.add_argument(
        "--connections-per-file",
        type=int,
        help=f"byte ranges fetched at once for a large file (default {CONNECTIONS_PER_FILE})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        help=f"extra ranged connections in all, beyond each file's first; also the small-file lane's"
        f" connections (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        help="files held under lease at once, downloading or waiting for a slot (default 4 x concurrency, at most 100)",
    )
    parser.add_argument(
        "--prefetch-bytes",
        type=int,
        help="small files: hold more than --prefetch files while their declared sizes add up to at most this"
        f" (up to {2 * CLAIM_MAX_FILES} files; default {PREFETCH_BYTES >> 20} MiB; 0: --prefetch alone)",
    )
    parser.add_argument("--label", help="instance label recorded with each lease (default: host-pid)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (DLW_EXECUTOR_METRICS_PORT; default off)",
    )
    parser.add_argument("--metrics-host", help="address of the metrics listener (default 127.0.0.1)")


def _http_url(text: str) -> bool:
    """Checked up front: httpx refuses a URL without scheme only at the first claim, which the
    loop would retry forever."""
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def config_from(args: argparse.Namespace) -> Config | list[str]:
    """The run's configuration, or the problems that prevent it (one line each)."""
    try:
        env = ExecutorSettings()
    except ValidationError as exc:
        return [
            f"invalid {'/'.join(str(p) for p in err['loc'])} in the environment: {err['msg']}" for err in exc.errors()
        ]
    token = args.token or env.token
    storage_list: list[str] = list(args.storage or []) or [s for s in (env.storage or "").split(os.pathsep) if s]
    storage = storage_list[0] if storage_list else None
    concurrency: int = env.concurrency if args.concurrency is None else args.concurrency
    lease_seconds: int = env.lease_seconds if args.lease_seconds is None else args.lease_seconds
    poll_seconds: float = env.poll_seconds if args.poll_seconds is None else args.poll_seconds
    progress_seconds: float = env.progress_seconds if args.progress_seconds is None else args.progress_seconds
    per_file: int = env.connections_per_file if args.connections_per_file is None else args.connections_per_file
    max_connections: int = env.max_connections if args.max_connections is None else args.max_connections
    prefetch_arg = env.prefetch if args.prefetch is None else args.prefetch
    prefetch: int = min(4 * concurrency, CLAIM_MAX_FILES) if prefetch_arg is None else prefetch_arg
    prefetch_bytes: int = env.prefetch_bytes if args.prefetch_bytes is None else args.prefetch_bytes
    problems = []
    if not token:
        problems.append("no executor token: pass --token or set DLW_EXECUTOR_TOKEN")
    if not storage:
        problems.append("no storage directory: pass --storage or set DLW_EXECUTOR_STORAGE")
    if concurrency < 1 or not LEASE_SECONDS_MIN <= lease_seconds <= LEASE_SECONDS_MAX or poll_seconds <= 0:
        problems.append(
            f"--concurrency must be >= 1, --lease-seconds {LEASE_SECONDS_MIN}..{LEASE_SECONDS_MAX}, --poll-seconds > 0"
        )
    if progress_seconds <= 0 or per_file < 1 or max_connections < 1:
        problems.append("--progress-seconds must be > 0, --connections-per-file and --max-connections >= 1")
    if not concurrency <= prefetch <= CLAIM_MAX_FILES:
        problems.append(f"--prefetch must be --concurrency..{CLAIM_MAX_FILES}")
    if prefetch_bytes < 0:
        problems.append("--prefetch-bytes must be >= 0")
    base_url = args.base_url or env.base_url
    if not _http_url(base_url):
        problems.append(f"--base-url must be an http:// or https:// URL with a host, not {base_url!r}")
    hf_endpoint = args.hf_endpoint or env.hf_endpoint
    if not _http_url(hf_endpoint):
        problems.append(f"--hf-endpoint must be an http:// or https:// URL with a host, not {hf_endpoint!r}")
    metrics_port = env.metrics_port if args.metrics_port is None else args.metrics_port
    if metrics_port is not None and not 0 < metrics_port < 65536:
        problems.append(f"--metrics-port must be 1..65535, not {metrics_port}")
    for root in storage_list:
        if Path(root).exists() and not Path(root).is_dir():
            problems.append(f"--storage {root} is not a directory (the executor writes files under it)")
    if problems:
        return problems
    assert token and storage
    label = args.label or env.label
    return Config(
        base_url=base_url,
        token=token,
        storage=Path(storage),
        more_storage=tuple(Path(root) for root in storage_list[1:]),
        hf_endpoint=hf_endpoint,
        hf_token=env.hf_token,
        concurrency=concurrency,
        lease_seconds=lease_seconds,
        poll_seconds=poll_seconds,
        progress_seconds=progress_seconds,
        connections_per_file=per_file,
        max_connections=max_connections,
        prefetch=prefetch,
        prefetch_bytes=prefetch_bytes,
        metrics_port=metrics_port,
        metrics_host=args.metrics_host or env.metrics_host,
        **({"label": label} if label else {}),
    )
