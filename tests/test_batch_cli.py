"""``v4serve batch`` as a user runs it: a real process on the real vLLM engine, killed with
SIGKILL in the middle of its job, then run again to the end.

The input names two models (tiny-llama, then tiny-chat of tests/fixtures/chat_overlay.yaml),
so the job cannot be over when its first result appears: the second engine has yet to
load. The kill comes as soon as one result is in the output; the re-run must skip what the
output holds and leave every input line answered exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from server.testing import server_env
from tests.conftest import FIXTURES, REPO, TEST_HOME, require_slow

pytestmark = pytest.mark.slow

COMPLETIONS = 200
CHATS = 20
# Generous: engine starts take minutes on a busy machine. A safety net, not a measurement.
RUN_SECONDS = 900


def batch_command(input_path: Path, output_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server",
        "batch",
        str(input_path),
        str(output_path),
        "--registry",
        str(FIXTURES / "chat_overlay.yaml"),
        "--home",
        str(TEST_HOME),
    ]


def write_input(path: Path) -> list[str]:
    """The input file; the custom_ids of its request lines, in order."""
    lines: list[dict[str, Any] | str] = []
    for i in range(COMPLETIONS):
        body = {"model": "tiny-llama", "prompt": f"line {i}", "max_tokens": 16, "ignore_eos": True}
        lines.append({"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    for i in range(CHATS):
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}
        lines.append({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    lines.append({"custom_id": "unknown-model", "url": "/v4/completions", "body": {"model": "nope", "prompt": "x"}})
    lines.append("{not json")
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return [x["custom_id"] for x in lines if isinstance(x, dict)]


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_a_job_killed_mid_run_finishes_on_a_rerun_with_each_line_once(tmp_path: Path) -> None:
    require_slow("runs v4serve batch with real engines")
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    custom_ids = write_input(input_path)
    total = len(custom_ids) + 1  # and the line that is not JSON
    env = server_env()
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen(
            batch_command(input_path, output_path),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + RUN_SECONDS
        # Until the engine has answered a line (lines without a model are answered first).
        while b'"status_code":200' not in (output_path.read_bytes() if output_path.exists() else b""):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no result before the deadline"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        # The engines' processes too: a killed job leaves them to their own fate.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    answered_before = complete_lines(output_path)
    assert 2 < answered_before < total, "the kill must come in the middle of the job"

    second = subprocess.run(
        batch_command(input_path, output_path),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        start_new_session=True,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    # Not a terminal: plain log lines per model, and the summary at the end.
    assert "batch: tiny-chat: 20 lines to run" in second.stderr
    summary = second.stdout.strip().splitlines()[-1]  # vLLM logs to stdout too
    assert summary.startswith("batch done: ") and f"{answered_before} already in the output" in summary, summary

    records = [json.loads(line) for line in output_path.read_text().splitlines()]
    assert len(records) == total
    counts = Counter(record["custom_id"] for record in records)
    assert counts == Counter([*custom_ids, None]), "each line exactly once"
    by_id = {record["custom_id"]: record for record in records}
    assert by_id["cmpl-7"]["response"]["status_code"] == 200
    assert by_id["cmpl-7"]["response"]["body"]["usage"]["completion_tokens"] == 16
    assert by_id["chat-3"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["unknown-model"]["response"]["status_code"] == 404
    assert by_id[None]["error"]["code"] == "invalid_json_line"

    # A third run finds nothing to do.
    third = subprocess.run(
        batch_command(input_path, output_path), cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_SECONDS
    )
    assert third.returncode == 0
    assert f"{total} already in the output" in third.stdout.strip().splitlines()[-1]
    assert complete_lines(output_path) == total
