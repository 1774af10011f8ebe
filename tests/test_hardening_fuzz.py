"""Schemathesis against the live server's /openapi.json: requests generated from the schema
(valid and invalid ones) never get a 5xx, and every response matches the schema (status codes
declared, content types, bodies).

Kept bounded for 2 CPU cores: a few examples per operation, derandomized, and generated
decodes are capped at 4 tokens and 2 choices (a body that asks for more is changed before it
is sent, never one that is invalid anyway).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 12
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2,
        "min_tokens": 4}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="session")
def api_schema(live_server: Any) -> Any:
    raw = httpx.get(live_server.base_url + "/openapi.json", timeout=30).json()
    assert raw["paths"], "no operations in /openapi.json"
    for ops in raw["paths"].values():  # the server's schema says 400, never 422
        for op in ops.values():
            assert "422" not in op["responses"]
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=live_server.base_url)
    return schema


def _cap(case: Any) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    for key, most in CAPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > most:
            body[key] = most
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", 4)
    if "input" in body:  # /v1/responses
        body.setdefault("max_output_tokens", 4)


def _fuzz(operation: Any, generation: Any, seen: dict[str, set[int]]) -> Any:
    from hypothesis import given

    @given(case=operation.as_strategy(generation_mode=generation))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        _cap(case)
        response = case.call_and_validate(checks=CHECKS, timeout=120)
        assert response.status_code < 500, response.text
        seen.setdefault(operation.label, set()).add(response.status_code)

    return run


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz(api_schema: Any, mode: str) -> None:
    """Every operation, EXAMPLES generated cases each. (Schemathesis' pytest plugin is driven
    by hand: its lazy fixture loader does not run under this pytest.)"""
    from schemathesis.generation import GenerationMode

    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    seen: dict[str, set[int]] = {}
    for operation in operations:
        if generation is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to get wrong: the GET routes take no parameters
        _fuzz(operation, generation, seen)()
    assert seen
    if generation is GenerationMode.POSITIVE:  # valid requests do get served
        assert 200 in seen["POST /v1/completions"] | seen["POST /v1/chat/completions"], seen
        assert 200 in seen["POST /v1/responses"], seen
    else:
        assert all(code >= 400 for codes in seen.values() for code in codes), seen
