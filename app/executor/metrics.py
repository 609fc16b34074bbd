"""The reference executor's own Prometheus metrics (`--metrics-port`): its throughput, the files
it finished by outcome, and the files in flight. A registry of its own, on a listener of its own
(127.0.0.1 unless --metrics-host says otherwise): the executor runs apart from the API."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ExecutorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.bytes = Counter("dlw_executor_downloaded_bytes", "Bytes downloaded", registry=self.registry)
        self.files = Counter(
            "dlw_executor_files",
            "Files finished: succeeded, failed_retryable, failed_final, lease_lost, released",
            ["outcome"],
            registry=self.registry,
        )
        self.active = Gauge("dlw_executor_active_files", "Files being downloaded now", registry=self.registry)

    def serve(self, host: str, port: int) -> None:
        """Start the listener (a daemon thread); OSError when the port cannot be bound."""
        start_http_server(port, addr=host, registry=self.registry)
