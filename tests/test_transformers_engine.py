"""The transformers engine (``engine: transformers``) keeps the contract the vLLM engine keeps.

Driven through the real server over HTTP with the ``scale-gp`` SDK, on a tiny T5 that
the project generates itself: an encoder-decoder model, which vLLM cannot serve. The
helpers the engine decodes with (stop-sequence holdback, incremental detokenization)
are also tested directly, and so is the engine's own ``abort``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest
from scale_gp import AsyncSGPClient, BadRequestError, SGPClient

from server.engines._detokenizer import IncrementalDetokenizer
from server.engines._stop_sequences import StopSequenceFilter
from tests.conftest import API_KEY, FIXTURES, TEST_HOME, RunningServer, start_server

MODEL = "tiny-t5"
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0}
# Greedy decoding of the tiny T5 ends this prompt with EOS after 7 tokens.
EOS_PROMPT = "Question 9: what is 9 plus 9?"
# ...and repeats one token over and over after this one.
REPETITIVE_PROMPT = "Once upon a time there was a model that answered"


@pytest.fixture(scope="module")
def t5_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("t5-server"),
        registry_files=[FIXTURES / "t5_overlay.yaml"],
        preload=[MODEL],
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(t5_server: RunningServer) -> SGPClient:
    return SGPClient(api_key=API_KEY, base_url=t5_server.base_url, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(t5_server: RunningServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEST_HOME / "builtin" / MODEL)


def complete(client: SGPClient, prompt: str = PROMPT, **params) -> tuple[str, str, dict]:
    response = client.completions.create(model=MODEL, prompt=prompt, model_parameters={**GREEDY, **params})
    return response.completion.text, response.completion.finish_reason, response.token_usage.model_dump()


def stream(client: SGPClient, prompt: str = PROMPT, **params) -> tuple[str, list[dict]]:
    chunks = [
        chunk.model_dump()
        for chunk in client.completions.create(
            model=MODEL, prompt=prompt, model_parameters={**GREEDY, **params}, stream=True
        )
    ]
    return "".join(chunk["completion"]["text"] for chunk in chunks), chunks


# Over HTTP --------------------------------------------------------------------------


def test_model_is_served_by_the_transformers_engine(t5_server: RunningServer) -> None:
    with t5_server.client() as http:
        models = http.get("/v4/models").json()["models"]
    entry = next(m for m in models if m["id"] == MODEL)
    assert (entry["engine"], entry["state"]) == ("transformers", "ready")


def test_completion_text_finish_reason_and_exact_usage(client: SGPClient, tokenizer) -> None:
    text, finish, usage = complete(client, max_tokens=20)
    assert text
    assert finish == "length"
    # The encoder input, EOS appended as T5's tokenizer does; every generated token.
    assert usage["prompt"] == len(tokenizer(PROMPT).input_ids)
    assert usage["completion"] == 20
    assert usage["prompt"] + usage["completion"] == usage["total"]


def test_streamed_pieces_make_the_non_streamed_text(client: SGPClient) -> None:
    text, finish, usage = complete(client, max_tokens=30)
    streamed, chunks = stream(client, max_tokens=30)
    assert streamed == text
    assert len(chunks) > 1
    assert all(c["completion"]["finish_reason"] is None and c["token_usage"] is None for c in chunks[:-1])
    assert chunks[-1]["completion"]["finish_reason"] == finish
    assert chunks[-1]["token_usage"] == usage


def test_eos_ends_the_completion_with_stop(client: SGPClient) -> None:
    text, finish, usage = complete(client, EOS_PROMPT, max_tokens=50)
    assert finish == "stop"
    assert usage["completion"] < 50  # the EOS token is counted, as vLLM counts it


def test_max_tokens_is_respected(client: SGPClient) -> None:
    for max_tokens in (1, 7):
        _, finish, usage = complete(client, max_tokens=max_tokens)
        assert (finish, usage["completion"]) == ("length", max_tokens)


def test_stop_sequence_is_excluded_in_both_modes(client: SGPClient) -> None:
    full, chunks = stream(client, max_tokens=40)
    pieces = [c["completion"]["text"] for c in chunks]
    # A stop sequence spanning two streamed pieces, from the middle of the greedy text:
    # its first half must be held back until the next token shows it is a stop.
    for k in range(len(pieces) // 2, len(pieces) - 1):
        stop = pieces[k][-2:] + pieces[k + 1][:2]
        position = len("".join(pieces[: k + 1])) - 2
        if len(stop) == 4 and stop.isprintable() and full.find(stop) == position:
            break
    else:
        pytest.fail(f"no usable stop sequence in {pieces!r}")
    expected = full[:position]
    text, finish, usage = complete(client, max_tokens=40, stop_sequences=[stop])
    assert (text, finish) == (expected, "stop")
    assert usage["completion"] < 40
    streamed, chunks = stream(client, max_tokens=40, stop_sequences=[stop, "never-appears"])
    assert streamed == expected
    assert chunks[-1]["completion"]["finish_reason"] == "stop"


def test_sampling_parameters_take_effect(client: SGPClient) -> None:
    greedy, _, _ = complete(client, REPETITIVE_PROMPT, max_tokens=20)
    # top_k 1 or a tiny top_p leave only the most likely token: sampling becomes greedy.
    assert complete(client, REPETITIVE_PROMPT, max_tokens=20, temperature=1.0, top_k=1)[0] == greedy
    assert complete(client, REPETITIVE_PROMPT, max_tokens=20, temperature=1.0, top_p=0.01)[0] == greedy
    # A frequency penalty breaks the greedy output's repetition.
    penalized, _, _ = complete(client, REPETITIVE_PROMPT, max_tokens=20, frequency_penalty=2.0)
    assert penalized != greedy
    assert len(set(penalized)) > len(set(greedy))
    _, finish, usage = complete(
        client, max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, presence_penalty=0.5
    )
    assert finish in {"stop", "length"} and 1 <= usage["completion"] <= 20


def test_concurrent_requests_share_decoder_steps(client: SGPClient, t5_server: RunningServer) -> None:
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(10, 14)]
    params = {**GREEDY, "max_tokens": 150}
    alone = {p: complete(client, p, **params)[0] for p in prompts}

    async def together() -> list[str]:
        async with AsyncSGPClient(api_key=API_KEY, base_url=t5_server.base_url, max_retries=0) as aclient:
            responses = await asyncio.gather(
                *(aclient.completions.create(model=MODEL, prompt=p, model_parameters=params) for p in prompts)
            )
        return [r.completion.text for r in responses]

    # Batched rows are padded and masked: each still decodes exactly as it did alone.
    assert dict(zip(prompts, asyncio.run(together()))) == alone
    # The engine logs each new high of sequences decoded in one step.
    peaks = re.findall(rf"model {MODEL}: (\d+) sequences in one step", t5_server.log())
    assert max(map(int, peaks)) == len(prompts)


def test_client_disconnect_stops_generation(t5_server: RunningServer) -> None:
    t5_server.wait_for_running(MODEL, lambda n: n == 0, 60)
    body = {
        "model": MODEL,
        "prompt": REPETITIVE_PROMPT,  # greedy decoding never reaches EOS
        "stream": True,
        # 400 tokens take this CPU many seconds; an abort frees the engine at once.
        "model_parameters": {"temperature": 0.0, "max_tokens": 400},
    }
    with httpx.Client(base_url=t5_server.base_url, headers={"x-api-key": API_KEY}, timeout=60) as http:
        with http.stream("POST", "/v4/completions", json=body) as response:
            assert response.status_code == 200
            # Held in a name: a dropped line iterator closes the connection when collected.
            events = response.iter_lines()
            received = [line for _, line in zip(range(6), events)]
            assert any(line.startswith("data: ") for line in received)
            assert t5_server.running_requests(MODEL) == 1
    assert t5_server.wait_for_running(MODEL, lambda n: n == 0, 5) < 5


def test_prompt_longer_than_the_context_is_refused(client: SGPClient, tokenizer) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 80
    length = len(tokenizer(prompt).input_ids)
    assert length > 512
    with pytest.raises(BadRequestError) as caught:
        complete(client, prompt, max_tokens=5)
    assert str(length) in str(caught.value) and "512" in str(caught.value)


def test_prompt_plus_max_tokens_over_the_context_is_refused(client: SGPClient) -> None:
    with pytest.raises(BadRequestError) as caught:
        complete(client, max_tokens=600)
    assert "max_tokens" in str(caught.value)


# The engine's helpers and its own abort, in process -------------------------------


def test_stop_filter_holds_back_a_possible_stop_start() -> None:
    stops = StopSequenceFilter(["END", "xyz"])
    assert stops.push("hello E") == ("hello ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("D and more") == ("", True)


def test_stop_filter_releases_held_text_when_it_is_not_a_stop() -> None:
    stops = StopSequenceFilter(["END"])
    assert stops.push("abc EN") == ("abc ", False)
    assert stops.push("ough") == ("ENough", False)
    assert stops.push("tail E") == ("tail ", False)
    assert stops.flush() == "E"
    assert stops.flush() == ""


def test_stop_filter_cuts_at_the_earliest_stop() -> None:
    stops = StopSequenceFilter(["world", "lo w"])
    assert stops.push("hello world") == ("hel", True)


def test_stop_filter_without_stops_passes_text_through() -> None:
    stops = StopSequenceFilter([])
    assert stops.push("any text") == ("any text", False)
    assert stops.flush() == ""


def test_detokenizer_pieces_make_the_whole_decode(tokenizer) -> None:
    ids = tokenizer("Le renard brun saute — déjà vu, naïve café! 0123456789").input_ids[:-1]
    ids += [700, 800, 900, 1000, 150, 250]  # arbitrary byte tokens, incomplete characters included
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenizer_keeps_sentencepiece_word_spaces() -> None:
    """flan-t5's tokenizer is SentencePiece: a token decoded alone loses its leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>"], unk_token="<unk>")
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    ids = tokenizer("the lazy fox jumps").input_ids
    assert "".join(tokenizer.decode([token]) for token in ids) != "the lazy fox jumps"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == "the lazy fox jumps"


def test_engine_abort_ends_the_request(t5_server: RunningServer) -> None:
    from server.engines.base import SamplingOptions
    from server.engines.transformers_engine import TransformersEngine
    from server.registry import ModelEntry

    entry = ModelEntry(source=f"builtin:{MODEL}", engine="transformers", max_model_len=512)
    greedy_400 = SamplingOptions(max_tokens=400, temperature=0.0)

    async def scenario() -> tuple[list, int, bool]:
        engine = await TransformersEngine.start(MODEL, entry, str(TEST_HOME / "builtin" / MODEL))
        try:
            prepared = await engine.prepare(REPETITIVE_PROMPT, greedy_400)
            deltas = []
            async for delta in engine.generate(prepared, "req-1"):
                deltas.append(delta)
                if len(deltas) == 2:
                    await engine.abort("req-1")
            return deltas, engine.stats().running, engine.alive
        finally:
            await engine.shutdown()
            assert not engine.alive

    deltas, still_running, alive = asyncio.run(scenario())
    assert deltas[-1].finish_reason == "abort"
    assert deltas[-1].completion_tokens < 400
    assert still_running == 0
    assert alive
