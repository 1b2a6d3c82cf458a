"""Property-based requests to ``POST /v4/chat-completions`` with a served model.

tests/test_schema_fuzz.py sends every route schema-generated bodies, but a generated
model name is only ever a 404 there for this route. Here every body names the served
model, so generated conversations, memory strategies, instructions and request templates
(random text, which the sandbox renders) reach the template worker and the engine: no
answer is a 5xx, and afterwards no request is left running.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import API_KEY, RunningServer
from tests.test_schema_fuzz import load_schema

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
ROUTE = "/v4/chat-completions"
EXAMPLES = 40


def send(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        params = case.body.get("model_parameters")
        if isinstance(params, dict) and isinstance(params.get("max_tokens"), int) and params["max_tokens"] > 8:
            params["max_tokens"] = 8
        elif case.body.get("model_parameters") is None and isinstance(case.body.get("messages"), list):
            # The registry default (100 tokens) makes each example slow; the edge is the point.
            case.body["model_parameters"] = {"max_tokens": 8}
    response = case.call(headers={"x-api-key": API_KEY}, timeout=600)
    case.validate_response(response, checks=[not_a_server_error])


def test_no_chat_input_makes_the_server_fail_or_leak(server: RunningServer) -> None:
    (operation,) = [op for op in (r.ok() for r in load_schema(server).get_all_operations()) if op.path == ROUTE]
    for mode in GenerationMode:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            send(case)

        fuzz()
    assert server.wait_for_running(MODEL, lambda n: n == 0, 60) < 60
