"""What a finished libcurl transfer of the small-file lane (app/executor/curl_lane.py) means for
the file: the same outcomes the threaded path gives (app/executor/http_ranges.py): Upstream for
an error status, WrongSize for other than the declared size, TransferError for the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pycurl

from app.executor.http_ranges import Upstream, WrongSize

if TYPE_CHECKING:
    from app.executor.lane_transfer import LaneTransfer


class TransferError(ConnectionError):
    """libcurl could not complete the transfer (connection refused, timeout, reset...)."""


def answer_problem(handle: pycurl.Curl, transfer: LaneTransfer[Any]) -> BaseException | None:
    """What is wrong with a transfer libcurl completed: not a 200, or fewer bytes than declared."""
    status = int(handle.getinfo(pycurl.RESPONSE_CODE))
    if status != 200:
        return Upstream(status, str(handle.getinfo(pycurl.EFFECTIVE_URL)))
    if transfer.written != transfer.size:
        return WrongSize(f"server sent fewer than the declared {transfer.size} bytes ({transfer.written} of them)")
    return None


def curl_problem(handle: pycurl.Curl, transfer: LaneTransfer[Any], code: int, message: str) -> BaseException:
    """What a transfer libcurl gave up on means: an error status (with its Retry-After), too many
    redirects, a protocol refused, an announced length above the declared size, or another failure."""
    url = str(handle.getinfo(pycurl.EFFECTIVE_URL))
    if code == pycurl.E_HTTP_RETURNED_ERROR:
        retry_after = int(handle.getinfo(pycurl.RETRY_AFTER))
        return Upstream(int(handle.getinfo(pycurl.RESPONSE_CODE)), url, float(retry_after) if retry_after > 0 else None)
    if code == pycurl.E_TOO_MANY_REDIRECTS:
        return Upstream(310, url)
    if code == pycurl.E_UNSUPPORTED_PROTOCOL:
        return Upstream(0, url)
    if code == pycurl.E_FILESIZE_EXCEEDED:  # refused on the announced length, before any byte
        announced = int(handle.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T))
        return WrongSize(f"server sent more than the declared {transfer.size} bytes (Content-Length {announced})")
    return TransferError(f"{message} (curl error {code})")
