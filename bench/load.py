"""HTTP load generator, run in its own process: `python -m bench.load SPEC.json` prints one JSON line.

A minimal HTTP/1.1 keep-alive client on asyncio streams (not httpx: on a 2-core machine the
client shares the CPU with the server under test, so it must cost as little as possible).
`concurrency` connections each send one request at a time, picked at random from `requests`
(pre-built raw bytes, e.g. one per tenant with its own token), for `warmup + duration` seconds.
Only responses that complete inside the measured window (after the warmup) are counted.

SPEC: {"host", "port", "requests": [latin-1 strings], "expect": 201, "concurrency", "warmup", "duration"}
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def build_request(host: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> str:
    """One raw HTTP/1.1 request (latin-1 text, so it survives JSON)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines) + body.decode("latin-1")


def print_table_head(head: str) -> None:
    """A table header and its rule."""
    print(head)
    print("-" * len(head))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(latencies_s: list[float], window_s: float) -> dict[str, float]:
    values = sorted(latencies_s)
    n = len(values)
    return {
        "count": n,
        "rps": n / window_s if window_s > 0 else 0.0,
        "mean_ms": 1000 * sum(values) / n if n else float("nan"),
        "p50_ms": 1000 * percentile(values, 0.50),
        "p99_ms": 1000 * percentile(values, 0.99),
    }


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"response without content-length: {head[:200]!r}")
    end = lower.index(b"\r\n", at + 2)
    length = int(lower[at + 17 : end])
    body = await reader.readexactly(length) if length else b""
    close = b"\r\nconnection: close" in lower
    return status, body, close


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], int(spec["port"])
    requests = [r.encode("latin-1") for r in spec["requests"]]
    expect = int(spec.get("expect", 200))
    concurrency = int(spec["concurrency"])
    start = time.perf_counter()
    measure_from = start + float(spec["warmup"])
    measure_to = measure_from + float(spec["duration"])
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    unexpected: list[str] = []
    completed = 0

    async def worker(seed: int) -> None:
        rnd = random.Random(seed)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= measure_to:
                    return
                writer.write(requests[rnd.randrange(len(requests))])
                status, body, close = await _read_response(reader)
                t1 = time.perf_counter()
                nonlocal completed
                completed += 1
                if measure_from <= t0 and t1 <= measure_to:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == expect:
                        latencies.append(t1 - t0)
                    elif len(unexpected) < 3:
                        unexpected.append(f"{status} {body[:300].decode(errors='replace')}")
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result: dict[str, Any] = summarize(latencies, measure_to - measure_from)
    result["errors"] = sum(n for code, n in statuses.items() if code != expect)
    result["statuses"] = {str(code): n for code, n in sorted(statuses.items())}
    result["unexpected"] = unexpected
    result["completed"] = completed  # all responses, warmup included
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(asyncio.run(_run(spec))))


if __name__ == "__main__":
    main()
