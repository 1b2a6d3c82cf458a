"""Log-probabilities are the model's own: transformers' ``log_softmax`` of the same weights
and tokens, within 1e-4.

The server (the session's, tests/conftest.py) serves the float32 tiny-llama with vLLM;
this process loads the same directory with transformers, in float32, and scores the
same token sequences. Every log-probability the routes return, of prompt tokens (echo),
of generated tokens and of the likeliest alternatives, is checked against it. As in
OpenAI's and vLLM's APIs, they are the raw model's: temperature, top-k and logit bias
change what is sampled, not the log-probabilities reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import openai
import pytest

from tests.conftest import API_KEY, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
TOLERANCE = 1e-4
# Top-2 logprobs closer than this may pick different argmaxes in two implementations:
# greedy paths are compared only while the choice is clear.
CLEAR_CHOICE = 1e-3
PROMPT = "The quick brown fox jumps over the lazy dog"
TOP = 5


class Reference:
    """tiny-llama under transformers, float32, in this process."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = TEST_HOME / "builtin" / MODEL
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.differences: list[float] = []

    def logprobs(self, ids: Sequence[int]) -> Any:
        """Row ``i``: the log-probabilities of the token after ``ids[: i + 1]``."""
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([list(ids)])).logits[0].float()
        return self.torch.log_softmax(logits, dim=-1)

    def check(self, served: float | None, expected: float) -> None:
        assert served is not None
        difference = abs(served - expected)
        self.differences.append(difference)
        assert difference <= TOLERANCE, f"served {served}, transformers {expected}"

    def check_among(self, served: Sequence[float], row: Any, candidates: Sequence[int]) -> None:
        """Each served value is the log-probability of one of ``candidates`` at ``row``."""
        expected = [float(row[token]) for token in candidates]
        for value in served:
            nearest = min(expected, key=lambda e: abs(e - value))
            self.check(value, nearest)

    def greedy(self, ids: Sequence[int], count: int) -> tuple[list[int], list[Any]]:
        """Greedy continuation and each step's row, cut where the choice is not clear."""
        sequence, rows = list(ids), []
        for _ in range(count):
            row = self.logprobs(sequence)[-1]
            first, second = self.torch.topk(row, 2).values.tolist()
            rows.append(row)
            sequence.append(int(row.argmax()))
            if first - second < CLEAR_CHOICE:
                break
        return sequence[len(ids) :], rows


@pytest.fixture(scope="module")
def reference(server: RunningServer) -> Iterator[Reference]:
    reference = Reference()
    yield reference
    if reference.differences:
        print(
            f"\nlog-probabilities: {len(reference.differences)} compared with transformers, "
            f"max |served - transformers| = {max(reference.differences):.3g}"
        )


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.base_url}/v1", max_retries=0, timeout=600)


def top_ids(reference: Reference, row: Any, count: int = TOP) -> list[int]:
    ids: list[int] = reference.torch.topk(row, count).indices.tolist()
    return ids


def test_echoed_prompt_logprobs_equal_transformers(client: openai.OpenAI, reference: Reference) -> None:
    """Any token sequence is scored as transformers scores it (the loglikelihood of lm-eval)."""
    ids = [*reference.tokenizer(PROMPT).input_ids, 17, 300, 5, 999, 42]
    completion = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=TOP)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    rows = reference.logprobs(ids)
    for position in range(1, len(ids)):
        row = rows[position - 1]
        reference.check(logprobs.token_logprobs[position], float(row[ids[position]]))
        top = logprobs.top_logprobs[position]
        assert top is not None and 1 <= len(top) <= TOP + 1
        reference.check_among(list(top.values()), row, [ids[position], *top_ids(reference, row)])


def test_generated_logprobs_equal_transformers(client: openai.OpenAI, reference: Reference) -> None:
    ids = reference.tokenizer(PROMPT).input_ids
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=TOP)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    generated, rows = reference.greedy(ids, 16)
    # Both stop at EOS or at the first unclear choice, whichever comes first.
    steps = min(len(rows), len(logprobs.token_logprobs))
    assert steps >= 1
    for step, row in enumerate(rows[:steps]):
        # Greedy: the chosen token is the likeliest, whose log-probability is the row's largest.
        reference.check(logprobs.token_logprobs[step], float(row[generated[step]]))
        reference.check(logprobs.token_logprobs[step], float(row.max()))
        top = logprobs.top_logprobs[step]
        assert top is not None
        reference.check_among(list(top.values()), row, top_ids(reference, row))
        reference.check(max(top.values()), float(row.max()))


def test_echo_and_generation_together_equal_transformers(client: openai.OpenAI, reference: Reference) -> None:
    ids = reference.tokenizer(PROMPT).input_ids
    completion = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=2, echo=True)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    generated, _ = reference.greedy(ids, 6)
    sequence = [*ids, *generated][: len(logprobs.token_logprobs)]
    assert len(sequence) > len(ids)
    rows = reference.logprobs(sequence)
    assert logprobs.token_logprobs[0] is None
    for position in range(1, len(sequence)):
        reference.check(logprobs.token_logprobs[position], float(rows[position - 1][sequence[position]]))


def test_chat_logprobs_equal_transformers(client: openai.OpenAI, reference: Reference) -> None:
    messages: list[Any] = [{"role": "user", "content": "Tell me about foxes."}]
    rendered = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = reference.tokenizer(rendered, add_special_tokens=False).input_ids
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=TOP
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None
    generated, rows = reference.greedy(ids, 12)
    steps = min(len(rows), len(content.content))
    assert steps >= 1
    for step, row in enumerate(rows[:steps]):
        entry = content.content[step]
        reference.check(entry.logprob, float(row[generated[step]]))
        # A list, likeliest first: the top 5 of transformers, one for one.
        expected = reference.torch.topk(row, TOP).values.tolist()
        assert len(entry.top_logprobs) == TOP
        for alternative, value in zip(entry.top_logprobs, expected, strict=True):
            reference.check(alternative.logprob, value)


def test_sampled_tokens_report_the_raw_models_logprobs(client: openai.OpenAI, reference: Reference) -> None:
    """Temperature and top-k shape the sampling; the reported value stays the model's."""
    ids = reference.tokenizer(PROMPT).input_ids
    row = reference.logprobs(ids)[-1]
    candidates = top_ids(reference, row, 3)
    for seed in range(4):
        completion = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=1, temperature=1.7, seed=seed, logprobs=0, extra_body={"top_k": 3}
        )
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
        (value,) = logprobs.token_logprobs
        reference.check_among([value], row, candidates)
        assert logprobs.top_logprobs[0] == {logprobs.tokens[0]: value}  # logprobs=0: the chosen token alone


def test_logit_bias_changes_the_choice_not_the_logprob(client: openai.OpenAI, reference: Reference) -> None:
    ids = reference.tokenizer(PROMPT).input_ids
    row = reference.logprobs(ids)[-1]
    unlikely = int(row.argmin())
    completion = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, logit_bias={str(unlikely): 100}
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    reference.check(logprobs.token_logprobs[0], float(row[unlikely]))


def test_streamed_logprobs_equal_the_whole_answers(client: openai.OpenAI, reference: Reference) -> None:
    ids = reference.tokenizer(PROMPT).input_ids
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": ids, "max_tokens": 10, "temperature": 0, "logprobs": 3}
    for echo in (False, True):
        whole = client.completions.create(echo=echo, **kwargs).choices[0].logprobs
        assert whole is not None and whole.token_logprobs is not None
        tokens: list[str] = []
        values: list[float | None] = []
        offsets: list[int] = []
        for chunk in client.completions.create(echo=echo, stream=True, **kwargs):
            part = chunk.choices[0].logprobs
            assert part is not None and part.tokens is not None and part.token_logprobs is not None
            tokens += part.tokens
            values += part.token_logprobs
            offsets += part.text_offset or []
        assert tokens == whole.tokens
        assert offsets == whole.text_offset  # offsets run on across chunks
        assert len(values) == len(whole.token_logprobs)
        for streamed, value in zip(values, whole.token_logprobs, strict=True):
            if value is None:
                assert streamed is None
            else:
                reference.check(streamed, value)
