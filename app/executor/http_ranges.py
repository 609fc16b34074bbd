"""HTTP for the threaded byte path (app/executor/transfer.py): keep-alive connections per
origin, a GET of a byte range that follows redirects (the hub token only to the file endpoint's
origin), and the checks that an answer is exactly the declared file's bytes. What goes wrong is
one of the exceptions below, as the runner reports it (docs/reference-executor.md)."""

from __future__ import annotations

import datetime
import email.utils
import http.client
import re
import ssl
import threading
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5


class WrongSize(ValueError):
    """The file endpoint sends (or announces) more or fewer bytes than the file's declared size:
    not the declared file, so a final failure, never a download."""


class Upstream(Exception):
    """The file endpoint answered with an error status (retry_after: its Retry-After, seconds)."""

    def __init__(self, status: int, url: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status
        self.retry_after = retry_after


class RangeIgnored(Exception):
    """The file endpoint answered a ranged request with the whole file: fetch it in one stream."""


class Cancelled(Exception):
    """The transfer was stopped from outside (lease lost, shutdown)."""


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delay-seconds or an HTTP-date (RFC 9110 10.2.3); None when absent
    or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.datetime.now(datetime.UTC)).total_seconds(), 0.0)


Origin = tuple[str, str | None, int | None]


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class ConnectionPool:
    """Idle keep-alive connections per origin, shared by an executor's transfers: small files
    reuse connections instead of opening one each (as curl --parallel does)."""

    def __init__(self, per_origin: int = 16) -> None:
        self.per_origin = per_origin
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def get(self, url: str, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the URL's origin and whether it was idle in the pool."""
        with self._lock:
            idle = self._idle.get(_origin(url))
            if idle:
                return idle.pop(), True
        return self.connect(url, timeout), False

    @staticmethod
    def connect(url: str, timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise Upstream(0, url)
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def put(self, url: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(_origin(url), [])
            if len(idle) < self.per_origin:
                idle.append(conn)
                return
        conn.close()


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _send(
    conn: http.client.HTTPConnection, url: str, headers: dict[str, str]
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    try:
        conn.request("GET", _target(url), headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def _request(
    pool: ConnectionPool, url: str, headers: dict[str, str], timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn, reused = pool.get(url, timeout)
    try:
        return _send(conn, url, headers)
    except (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionError):
        if not reused:
            raise
    # The server closed the idle connection meanwhile: once more, on a new one.
    return _send(pool.connect(url, timeout), url, headers)


def open_range(
    url: str,
    headers: dict[str, str],
    start: int,
    end: int | None,
    timeout: float,
    auth_origin: str,
    pool: ConnectionPool,
    first_answer: dict[str, str] | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """GET bytes start..end (inclusive; None: to the end, no Range header at 0), following
    redirects; returns the connection (the caller gives it back to the pool or closes it), the
    answer and the URL that gave it. The Authorization header goes only to `auth_origin` (the
    file endpoint): LFS files redirect to a CDN, which must not see the hub token. With
    `first_answer`, the ETag the first answer gave (X-Linked-Etag, else ETag) is put there."""
    trusted = _origin(auth_origin)
    for hop in range(MAX_REDIRECTS + 1):
        send = {"Accept-Encoding": "identity", **headers}
        if _origin(url) != trusted:
            send.pop("Authorization", None)
        if start or end is not None:
            send["Range"] = f"bytes={start}-{'' if end is None else end}"
        conn, response = _request(pool, url, send, timeout)
        if hop == 0 and first_answer is not None:
            etag = response.getheader("X-Linked-Etag") or response.getheader("ETag")
            if etag:
                first_answer["etag"] = etag
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            url = urljoin(url, response.getheader("Location", ""))
            conn.close()
            continue
        if response.status not in (200, 206):
            retry = _retry_after(response.getheader("Retry-After"))
            conn.close()
            raise Upstream(response.status, url, retry)
        return conn, response, url
    raise Upstream(310, url)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


def check_answer(response: http.client.HTTPResponse, size: int, start: int, end: int) -> None:
    """The answer is exactly bytes start..end of a file of the declared size, or WrongSize."""
    length = response.getheader("Content-Length")
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.getheader("Content-Range", ""))
        if not match or int(match[1]) != start:
            raise WrongSize(f"server answered a range other than bytes {start}-{end}")
        if match[3] != "*" and int(match[3]) != size:
            raise WrongSize(f"server sent a file of {match[3]} bytes, not the declared {size}")
        if int(match[2]) != end:
            raise WrongSize(f"server ended the range at {match[2]}, not {end} (declared size {size})")
    elif start or end != size - 1:
        raise RangeIgnored()
    if length is not None and length.strip().isdigit():
        announced = int(length)
        if response.status == 200 and announced > size:
            raise WrongSize(f"server sent more than the declared {size} bytes (Content-Length {announced})")
        if response.status == 200 and announced < size:
            raise WrongSize(
                f"server sent fewer than the declared {size} bytes ({announced} announced by Content-Length)"
            )
