"""lm-evaluation-harness, unmodified, scores a model through the server as it scores the
same weights in process.

lm-eval's CLI runs three small tasks over local JSONL files (tests/fixtures/lm_eval/,
``dataset_path: json``, no hub): a loglikelihood multiple-choice task and a greedy
``generate_until`` task through ``local-completions`` (``/v1/completions``: token-ID
prompts, ``echo`` with ``logprobs`` and ``max_tokens: 1`` for the loglikelihoods), and
the generation task again through ``local-chat-completions`` (``/v1/chat/completions``,
``--apply_chat_template``). The same tasks then run with lm-eval's own ``hf`` model on the
same tiny weights in float32. Accuracies must be equal, every per-choice loglikelihood
within ``LOGLIKELIHOOD_TOLERANCE`` (vLLM's CPU kernels and torch's eager ones sum in
different orders), and the greedy generations identical.

One difference is by design and allowed for: the random tiny model often ends on a token
that is only part of a UTF-8 character. transformers decodes it to U+FFFD; vLLM (and so
this server, as vLLM's own) does not send the bytes of a character it never completed.
Generations are compared with trailing U+FFFD removed; everything before must be equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, FIXTURES, REPO, TEST_HOME, RunningServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
TASKS = FIXTURES / "lm_eval"
# Per-sample loglikelihood sums over ~10 tokens; observed differences are ~1e-5.
LOGLIKELIHOOD_TOLERANCE = 1e-3
RUN_TIMEOUT = 300


class LmEvalRun:
    """``python -m lm_eval`` with ``args``, offline, started at once; ``result`` waits for it
    and returns its results and, per task, its samples (by doc_id)."""

    def __init__(self, tmp: Path, name: str, *args: str):
        self.name = name
        self.output = tmp / name
        self.log = tmp / f"{name}.log"
        env = {
            **os.environ,
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            # A datasets cache of the test's own: nothing shared with other runs.
            "HF_DATASETS_CACHE": str(tmp / "datasets" / name),
            "OPENAI_API_KEY": API_KEY,
            "TOKENIZERS_PARALLELISM": "false",
        }
        command = [sys.executable, "-m", "lm_eval", *args, "--include_path", str(TASKS), "--log_samples"]
        command += ["--output_path", str(self.output)]
        with self.log.open("wb") as log:
            # cwd: the task files name their data relative to the repository.
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def result(self) -> dict[str, Any]:
        try:
            code = self.process.wait(RUN_TIMEOUT)
        finally:
            self.stop()
        assert code == 0, f"lm_eval {self.name} failed:\n{self.log.read_text()[-8000:]}"
        (results_file,) = self.output.glob("*/results_*.json")
        samples: dict[str, dict[int, Any]] = {}
        for path in self.output.glob("*/samples_*.jsonl"):
            task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
            samples[task] = {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}
        return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


@pytest.fixture(scope="module")
def runs(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each task set through the server and with the hf model, the two side by side."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    # The session's server has tiny-llama loaded, so its weights are generated.
    weights = TEST_HOME / "builtin" / MODEL
    hf = ["--model", "hf", "--model_args", f"pretrained={weights},dtype=float32", "--device", "cpu"]
    completions = (
        f"model={MODEL},base_url={server.base_url}/v1/completions,tokenizer={weights},"
        # add_bos_token: the token IDs lm-eval sends start with BOS, as the hf model's do.
        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,add_bos_token=True"
    )
    chat = f"model={MODEL},base_url={server.base_url}/v1/chat/completions,num_concurrent=1,max_retries=1"
    served_completions = ["--model", "local-completions", "--model_args", completions]
    served_chat = ["--model", "local-chat-completions", "--model_args", chat, "--apply_chat_template"]
    results: dict[str, dict[str, Any]] = {}
    # Two at a time: the hf run computes while the served one waits on the server.
    for kind, served, reference in [
        (
            "completions",
            [*served_completions, "--tasks", "v4serve_mc,v4serve_gen"],
            [*hf, "--tasks", "v4serve_mc,v4serve_gen"],
        ),
        ("chat", [*served_chat, "--tasks", "v4serve_chat"], [*hf, "--apply_chat_template", "--tasks", "v4serve_chat"]),
    ]:
        pair = LmEvalRun(tmp, f"served-{kind}", *served), LmEvalRun(tmp, f"hf-{kind}", *reference)
        try:
            for run in pair:
                results[run.name] = run.result()
        finally:
            for run in pair:
                run.stop()
    return results


def loglikelihoods(row: dict[str, Any]) -> list[float]:
    # One response per choice: [[loglikelihood, is_greedy]], as strings in the log.
    return [float(response[0][0]) for response in row["resps"]]


def generation(row: dict[str, Any]) -> str:
    ((text,),) = row["resps"]
    assert isinstance(text, str)
    return text.rstrip("\ufffd")


def test_multiple_choice_scores_equal_the_hf_model(runs: dict[str, dict[str, Any]]) -> None:
    served, reference = runs["served-completions"], runs["hf-completions"]
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["v4serve_mc"][metric] == reference["results"]["v4serve_mc"][metric], metric
    rows, expected = served["samples"]["v4serve_mc"], reference["samples"]["v4serve_mc"]
    assert rows.keys() == expected.keys() and len(rows) == 8
    for doc_id, row in rows.items():
        got, want = loglikelihoods(row), loglikelihoods(expected[doc_id])
        assert got == pytest.approx(want, abs=LOGLIKELIHOOD_TOLERANCE), f"doc {doc_id}"
        assert row["acc"] == expected[doc_id]["acc"] and row["acc_norm"] == expected[doc_id]["acc_norm"]


@pytest.mark.parametrize(("kind", "task"), [("completions", "v4serve_gen"), ("chat", "v4serve_chat")])
def test_greedy_generations_equal_the_hf_model(runs: dict[str, dict[str, Any]], kind: str, task: str) -> None:
    served, reference = runs[f"served-{kind}"], runs[f"hf-{kind}"]
    rows, expected = served["samples"][task], reference["samples"][task]
    assert rows.keys() == expected.keys() and len(rows) == 6
    for doc_id, row in rows.items():
        assert generation(row), f"doc {doc_id}: nothing generated"
        assert generation(row) == generation(expected[doc_id]), f"doc {doc_id}"
    metric = "exact_match,none"
    assert served["results"][task][metric] == reference["results"][task][metric]
