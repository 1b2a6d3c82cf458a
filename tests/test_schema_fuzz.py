"""Property-based requests against the real server, from its own OpenAPI schema.

Schemathesis generates bodies that fit the schema and bodies that break it (wrong types,
out-of-range numbers, odd Unicode, missing fields) for every route, and sends them to the
running server with the tiny model. Whatever it sends, the server answers without a 5xx,
and afterwards no request is left running in the engine.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import API_KEY, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
# Enough examples to reach the odd corners of each route, few enough for CI's budget.
EXAMPLES = 40


def load_schema(server: RunningServer) -> schemathesis.BaseSchema:
    raw = httpx.get(server.base_url + "/openapi.json", headers={"x-api-key": API_KEY}, timeout=30)
    raw.raise_for_status()
    schema = schemathesis.openapi.from_dict(raw.json())
    schema.config.update(base_url=server.base_url)
    return schema


def send(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict) and case.operation.path == "/v4/completions":
        # A random model name is only ever a 404; the served model reaches the engine.
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        # Keep generation short: the fuzzing is about the edge, not the length of answers.
        params = case.body.get("model_parameters")
        if isinstance(params, dict) and isinstance(params.get("max_tokens"), int) and params["max_tokens"] > 16:
            params["max_tokens"] = 16
    response = case.call(headers={"x-api-key": API_KEY}, timeout=600)
    case.validate_response(response, checks=[not_a_server_error])


def test_no_input_makes_the_server_fail_or_leak(server: RunningServer) -> None:
    # Schemathesis' pytest plugin does not load under this pytest; driving each operation's
    # Hypothesis strategy directly is the same generation without the plugin.
    operations = [result.ok() for result in load_schema(server).get_all_operations()]
    assert any(op.path == "/v4/completions" for op in operations)
    # A route without inputs has no invalid variant to generate.
    runs = [
        (op, mode) for op in operations for mode in GenerationMode if op.method == "post" or mode.value == "positive"
    ]
    without_invalid_inputs = set()
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            send(case)

        try:
            fuzz()
        except Unsatisfiable:
            # A POST whose only input is a free-form path segment (a batch's cancel, the
            # registry reload) has no invalid variant either; Hypothesis says so this way.
            if mode is not GenerationMode.NEGATIVE:
                raise
            without_invalid_inputs.add(operation.path)
    assert "/v4/completions" not in without_invalid_inputs
    assert "/v1/chat/completions" not in without_invalid_inputs
    server.wait_for_running(MODEL, lambda n: n == 0, 120)
