"""Schemathesis hooks of the API fuzzer (tests/e2e/test_api_fuzz.py), loaded by the `st` CLI
through SCHEMATHESIS_HOOKS.

- Where the OpenAPI document lists a 400/422 code about the data's meaning (INVALID_CURSOR,
  UNKNOWN_PROJECT, ...), the fuzzer lets schema-valid data be answered so; the check below keeps
  the rest of positive_data_acceptance there: schema-valid data is never malformed. "Schema-valid"
  is checked against the document (DLW_FUZZ_SCHEMA) itself: a stateful link may carry a value
  the target does not take (the `user_id` of /auth/me is no users.id for a token's subject).
- A claim's wait_seconds is sent as 0 (_no_wait): a long poll per case would take the run hours.
- JSON Schema counts 5.0 as an integer; this API does not (strict input, docs/errors.md), and
  no schema keyword can say so. Positive cases therefore send integral numbers as integers
  (map_case below); negative cases still send 5.0 and must be refused."""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import jsonschema_rs
import schemathesis

from app.domain import CLAIM_WAIT_SECONDS_MAX

MALFORMED = frozenset({"VALIDATION_FAILED", "INVALID_JSON", "DUPLICATE_KEY"})


def _integers(value: Any) -> Any:
    """value with every integral float (13.0) written as an integer (13)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integers(item) for item in value]
    return value


CLAIM = "/api/v1/executor/claim"


def _no_wait(body: Any) -> Any:
    """A claim's wait_seconds within bounds becomes 0: an empty claim would otherwise sit for up
    to 20 s per case (the wait is tested in tests/e2e/test_claim_wait.py); values out of bounds
    stay, to be refused."""
    wait = body.get("wait_seconds") if isinstance(body, dict) else None
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= CLAIM_WAIT_SECONDS_MAX:
        return {**body, "wait_seconds": 0}
    return body


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """The request models have no `number` field: a float in a positive case stands for an
    integer. Claims never wait (_no_wait)."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive:
        case.body = _integers(case.body)
        if case.query:
            case.query = _integers(case.query)
    if case.operation.path == CLAIM:
        case.body = _no_wait(case.body)
    return case


@cache
def _document() -> dict[str, Any]:
    with open(os.environ["DLW_FUZZ_SCHEMA"], encoding="utf-8") as file:
        document: dict[str, Any] = json.load(file)
    return document


def _valid(schema: dict[str, Any], value: Any) -> bool:
    rooted = {**schema, "components": _document()["components"]}  # so "#/components/..." resolves
    return bool(jsonschema_rs.validator_for(rooted, validate_formats=True).is_valid(value))


def _schema_valid(case: Any) -> bool:
    """Whether every parameter and the body of the case are what the document allows."""
    operation = _document()["paths"][case.operation.path][case.method.lower()]
    sent = {"path": case.path_parameters or {}, "query": case.query or {}, "header": case.headers or {}}
    for parameter in operation.get("parameters", []):
        values = sent[parameter["in"]]
        if parameter["in"] == "header":
            values = {k.lower(): v for k, v in values.items()}
        name = parameter["name"].lower() if parameter["in"] == "header" else parameter["name"]
        if name in values and not _valid(parameter["schema"], values[name]):
            return False
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    return body is None or case.body is None or _valid(body, case.body)


@schemathesis.check
def schema_valid_data_is_not_malformed(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    try:
        code = response.json()["detail"]["code"]
    except (ValueError, KeyError, TypeError):
        return None  # the schema conformance check reports a wrong shape
    if code in MALFORMED and _schema_valid(case):
        raise AssertionError(f"schema-valid data answered 422 {code}: {response.text[:500]}")
    return None
