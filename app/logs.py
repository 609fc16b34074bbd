"""Logging for every `dlw` command: DLW_LOG_FORMAT=text (the default) or json, DLW_LOG_LEVEL.

json writes one object per line: time, level, logger, message, and inside an API request the
request's own fields (request_id, method, route, status, duration_ms, tenant_id, principal_id),
which app/api/request_context.py keeps in a context variable. Only those named fields are ever
copied from a request; headers, tokens, secrets and idempotency keys never are, and a bearer
credential that a library might put in a message is masked anyway.

Read from the environment here, not from app/config.py: the executor logs the same way and must
not load the server's settings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from app.operator_errors import EXIT_USAGE, OperatorError

FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# The request being served, set by the API's middleware; None outside a request.
REQUEST_FIELDS: ContextVar[dict[str, Any] | None] = ContextVar("dlw_request_fields", default=None)
# Fields a record may carry (logger.info(..., extra={...})) that the JSON line copies.
RECORD_FIELDS = ("request_id", "method", "route", "status", "duration_ms", "tenant_id", "principal_id")
_BEARER = re.compile(r"(?i)\b(bearer|token)(\s+|=)[A-Za-z0-9._~+/=-]{8,}")


def mask_credentials(text: str) -> str:
    return _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_credentials(record.getMessage()),
        }
        line.update(REQUEST_FIELDS.get() or {})
        for name in RECORD_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info:
            line["exception"] = mask_credentials(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_credentials(super().format(record))


def log_format() -> str:
    value = os.environ.get("DLW_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in FORMATS:
        raise OperatorError(f"DLW_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {value!r}", EXIT_USAGE)
    return value


def formatter() -> logging.Formatter:
    return JsonFormatter() if log_format() == "json" else TextFormatter(TEXT_FORMAT)


def configure_logging() -> None:
    """One stderr handler on the root logger; uvicorn's loggers propagate to it (serve passes
    log_config=None), so its lines take the same format. The access log (dlw.access) is on stdout."""
    level = os.environ.get("DLW_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in logging.getLevelNamesMapping():
        raise OperatorError(f"DLW_LOG_LEVEL must be a logging level (INFO, DEBUG, ...), not {level!r}", EXIT_USAGE)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Access lines go to stdout, everything else to stderr, as uvicorn's own access log did:
    # a supervisor that discards or pipes stdout never stalls the API on its request volume.
    access = logging.getLogger("dlw.access")
    for old in list(access.handlers):
        access.removeHandler(old)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(handler.formatter)
    access.addHandler(out)
    access.propagate = False
    logging.getLogger("yoyo").setLevel(logging.WARNING)  # one line per step is noise
