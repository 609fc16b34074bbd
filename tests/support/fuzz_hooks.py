"""Schemathesis hooks of the API fuzzer (tests/e2e/test_api_fuzz.py), loaded by the `st` CLI
through SCHEMATHESIS_HOOKS.

- Where the OpenAPI document lists a 400/422 code about the data's meaning (INVALID_CURSOR,
  UNKNOWN_PROJECT, ...), the fuzzer lets schema-valid data be answered so; the check below keeps
  the rest of positive_data_acceptance there: schema-valid data is never malformed.
- JSON Schema counts 5.0 as an integer; this API does not (strict input, docs/errors.md), and
  no schema keyword can say so. Positive cases therefore send integral numbers as integers
  (map_case below); negative cases still send 5.0 and must be refused."""

from __future__ import annotations

from typing import Any

import schemathesis

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


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """The request models have no `number` field: a float in a positive case stands for an integer."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive:
        case.body = _integers(case.body)
        if case.query:
            case.query = _integers(case.query)
    return case


@schemathesis.check
def schema_valid_data_is_not_malformed(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    try:
        code = response.json()["detail"]["code"]
    except (ValueError, KeyError, TypeError):
        return None  # the schema conformance check reports a wrong shape
    if code in MALFORMED:
        raise AssertionError(f"schema-valid data answered 422 {code}: {response.text[:500]}")
    return None
