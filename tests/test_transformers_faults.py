"""A model call that fails for one request fails that request alone, not its batch.

The real transformers engine runs in process on the two tiny models its other tests use
(tiny T5, an encoder-decoder; tiny MPT, decoder-only). The test takes control of when
the engine's worker thread runs by wrapping the model class's ``forward`` (``Forward``):
the worker can be held inside a chosen model call while requests arrive, so that which
requests share a batch is decided by the test, not by the machine's speed.

The faults:

- a prompt holding a token ID past the model's embedding table, which is what a
  tokenizer with more tokens than its model produces: a real fault (the embedding raises
  IndexError). The tiny tokenizers make no such ID, so that request is handed to the
  engine as token IDs;
- a decoding step that raises because of one row: injected, since no input of the tiny
  models fails only once decoding has begun. The wrapped ``forward`` raises whenever a
  sequence reaches ``MARKED_LENGTH`` tokens, as a model run past its position table
  would;
- a step that raises once, for no row in particular (a passing fault): injected too.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server.engines.base import PreparedRequest, SamplingOptions
from server.engines.transformers_engine import TransformersEngine
from server.errors import EngineError
from server.registry import ModelEntry
from server.weights.tiny import TOKENIZER_VOCAB_SIZE, ensure_builtin
from tests.conftest import TEST_HOME

pytestmark = pytest.mark.slow

# Greedy decoding of both tiny models never reaches EOS after this prompt.
PROMPT = "Once upon a time there was a model that answered"
# Model -> the class whose forward the worker calls.
MODEL_CLASSES = {"tiny-t5": "T5ForConditionalGeneration", "tiny-mpt": "MptForCausalLM"}
# Model -> a prompt whose greedy continuation is varied text, not one token repeated.
VARIED = {"tiny-t5": "The quick brown fox", "tiny-mpt": "Question 10: what is 10 plus 10?"}


class Forward:
    """Wraps a model class's ``forward``: counts calls, can hold the worker in one, can raise."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold_at: int | None = None  # the call to hold the worker in, until released
        self.held, self.released = threading.Event(), threading.Event()
        self.fails: Callable[[dict[str, Any]], bool] = lambda kwargs: False

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)  # the engine reads forward's parameters
        def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.hold_at:
                self.held.set()
                self.released.wait()
            if self.fails(kwargs):
                raise RuntimeError("injected fault")
            return forward(model, *args, **kwargs)

        return wrapper

    def hold_next_call(self) -> None:
        self.hold_at = self.calls + 1

    async def until_held(self) -> None:
        await asyncio.to_thread(self.held.wait)


@pytest.fixture(params=list(MODEL_CLASSES))
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def forward(model: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Forward]:
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[model])
    controller = Forward()
    monkeypatch.setattr(model_class, "forward", controller.wrap(model_class.forward))
    yield controller
    controller.released.set()  # never leave the worker held


async def start(model: str) -> TransformersEngine:
    entry = ModelEntry(
        source=f"builtin:{model}",
        engine="transformers",
        dtype="float32",
        max_model_len=512,
        engine_args={"max_batch_size": 8},
    )
    return await TransformersEngine.start(model, entry, str(ensure_builtin(model, TEST_HOME)))


def greedy(max_tokens: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, temperature=0.0)


async def outcome(
    engine: TransformersEngine, request: PreparedRequest, request_id: str
) -> tuple[str, str | None] | EngineError:
    """The request's whole text and finish reason, or the error it ended with."""
    text, finish = "", None
    try:
        async for delta in engine.generate(request, request_id):
            text, finish = text + delta.text, delta.finish_reason
    except EngineError as exc:
        return exc
    return text, finish


async def submitted(engine: TransformersEngine, count: int) -> None:
    """Let the event loop run until ``count`` requests are in the worker's hands."""
    for _ in range(1000):
        if engine.stats().running == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{engine.stats().running} requests submitted, not {count}")


def assert_failed_alone(result: object) -> None:
    assert isinstance(result, EngineError), result
    assert "failed on this request" in result.message


async def test_a_prompt_the_model_cannot_embed_fails_only_its_own_request(model: str, forward: Forward) -> None:
    engine = await start(model)
    try:
        decoding = await engine.prepare(PROMPT, greedy(30))
        joining = await engine.prepare(VARIED[model], greedy(12))
        past_the_table = PreparedRequest(
            prompt_tokens=3, sampling=greedy(5), engine_input=[5, 6, TOKENIZER_VOCAB_SIZE + 7]
        )
        alone = [await outcome(engine, request, "alone") for request in (decoding, joining)]

        forward.hold_next_call()  # hold the worker inside the first request's prefill
        first = asyncio.create_task(outcome(engine, decoding, "decoding"))
        await forward.until_held()
        others = [
            asyncio.create_task(outcome(engine, past_the_table, "bad")),
            asyncio.create_task(outcome(engine, joining, "joining")),
        ]
        await submitted(engine, 3)
        forward.released.set()  # the two others join together while the first decodes
        results = await asyncio.gather(first, *others)
    finally:
        await engine.shutdown()
    assert [results[0], results[2]] == alone  # the other two decoded as if alone
    assert_failed_alone(results[1])
    assert "IndexError" in results[1].message


@pytest.mark.parametrize("model", ["tiny-mpt"], indirect=True)
async def test_a_step_that_fails_for_one_row_fails_only_that_request(model: str, forward: Forward) -> None:
    engine = await start(model)
    try:
        short = await engine.prepare(PROMPT, greedy(12))
        long = await engine.prepare(PROMPT + " at length", greedy(20))
        # The short one never gets there; the long one does after a few steps in the batch.
        marked_length = short.prompt_tokens + 12 + 1
        assert long.prompt_tokens + 2 < marked_length < long.prompt_tokens + 20
        alone = await outcome(engine, short, "alone")

        forward.fails = lambda kwargs: int(kwargs["attention_mask"].sum(dim=1).max()) >= marked_length
        forward.hold_next_call()
        tasks = [asyncio.create_task(outcome(engine, r, name)) for r, name in ((short, "short"), (long, "long"))]
        await forward.until_held()
        await submitted(engine, 2)
        forward.released.set()
        results = await asyncio.gather(*tasks)
    finally:
        await engine.shutdown()
    assert results[0] == alone
    assert_failed_alone(results[1])
    assert engine.stats().peak_batch_size == 2  # they did share steps


async def test_a_step_that_fails_once_fails_no_request(model: str, forward: Forward) -> None:
    engine = await start(model)
    try:
        requests = [await engine.prepare(VARIED[model], greedy(24)), await engine.prepare(PROMPT, greedy(16))]
        alone = [await outcome(engine, request, "alone") for request in requests]

        forward.hold_next_call()
        tasks = [asyncio.create_task(outcome(engine, r, f"r{i}")) for i, r in enumerate(requests)]
        await forward.until_held()
        await submitted(engine, 2)
        fault_at = forward.calls + 3  # a decoding step, once both are in the batch

        forward.fails = lambda kwargs: forward.calls == fault_at
        forward.released.set()
        results = await asyncio.gather(*tasks)
    finally:
        await engine.shutdown()
    # Each rebuilt alone from its prompt and tokens so far, and decoded on as before.
    assert results == alone
    assert forward.calls > fault_at  # the fault did happen
