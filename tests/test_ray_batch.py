"""``v4serve batch INPUT OUTPUT --ray ADDRESS``: one job across engine hosts on a Ray cluster.

The session's Ray node on loopback (tests/ray_cluster.py) stands for two nodes by its
custom resources ``host_a`` and ``host_b``: one engine host per name. The job runs as a
user runs it (``python -m server batch``), two tiny models on the transformers engine.
Proven from the output file, the usage ledger and the job's own log lines: every input
line answered exactly once, and recorded once in the ledger (each line that reached a
model, under its output line's request ID), shards run on both hosts, the per-model
progress logged, a re-run adds nothing, and SIGKILL of one host's process mid-job (a lost
node) costs only its unfinished lines, which the other host runs, recorded once too.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from server.telemetry import Ledger, UsageFilter
from server.testing import server_env
from tests.conftest import FIXTURES, REPO, TEST_HOME
from tests.ray_cluster import HOSTS, RAY_ENV, RayNode

pytestmark = pytest.mark.slow

MODELS = ("tiny-ray-llama", "tiny-ray-mpt")
JOB_SECONDS = 900


def write_input(path: Path, count: int, max_tokens: int) -> list[str]:
    """``count`` lines alternating the two models, then two faulty ones; the custom_ids
    of the lines that run."""
    lines, ids = [], []
    for i in range(count):
        body = {"model": MODELS[i % 2], "prompt": f"Line {i}:", "model_parameters": {"max_tokens": max_tokens}}
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v4/completions", "body": body}))
        ids.append(f"line-{i}")
    lines.append("{not json")
    lines.append(
        json.dumps(
            {
                "custom_id": "unknown",
                "method": "POST",
                "url": "/v4/completions",
                "body": {"model": "nope", "prompt": "x"},
            }
        )
    )
    path.write_text("\n".join(lines) + "\n")
    return ids


def batch_command(node: RayNode, input_path: Path, output_path: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "server", "batch", str(input_path), str(output_path)]
    command += ["--home", str(TEST_HOME), "--registry", str(FIXTURES / "ray_overlay.yaml"), "--ray", node.address]
    for host in HOSTS:
        command += ["--ray-replica-resource", host]
    return [*command, *extra]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(path: Path, ids: list[str]) -> None:
    """Every line once: the ones that ran answered 200, the faulty ones with their error."""
    found = records(path)
    ran = collections.Counter(r["custom_id"] for r in found if r["response"] is not None)
    assert ran == collections.Counter([*ids, "unknown"])
    statuses = {r["custom_id"]: r["response"]["status_code"] for r in found if r["response"] is not None}
    assert {statuses[i] for i in ids} == {200}
    assert statuses["unknown"] == 404
    (fault,) = [r for r in found if r["response"] is None]
    assert fault["error"]["code"] == "invalid_json_line"


def check_ledger(location: Path, output_path: Path, since: float) -> None:
    """One record per output line that reached a model (not the unknown model's line),
    under its request ID, with its status and the tokens of its body's ``token_usage``."""
    # The ledger may be shared (the test home's): only this job's request IDs count.
    ran = [r for r in records(output_path) if r["response"] is not None]
    by_id = {r["response"]["request_id"]: r for r in ran}
    rows = Ledger(location, writable=False).query(UsageFilter(since=since, limit=100_000)).rows
    mine = collections.Counter(row.request_id for row in rows if row.request_id in by_id)
    reached = {i for i, r in by_id.items() if r["custom_id"] != "unknown"}
    assert mine == collections.Counter(reached)
    for row in rows:
        if row.request_id not in reached:
            continue
        response = by_id[row.request_id]["response"]
        usage = response["body"]["token_usage"]
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, usage["prompt"], usage["completion"])
        assert usage["completion"] > 0
        # write_input alternates the models: line-i asks MODELS[i % 2].
        model = MODELS[int(by_id[row.request_id]["custom_id"].removeprefix("line-")) % 2]
        assert (row.model, row.route, row.source, row.key_name) == (model, "/v4/completions", "batch", "batch")
        assert row.duration > 0


def hosts_per_model(log: str) -> dict[str, set[str]]:
    """Which hosts ran lines of each model, from the job's log lines."""
    ran: dict[str, set[str]] = collections.defaultdict(set)
    for host, model in re.findall(r"host (\S+): \d+ lines of (.+)", log):
        ran[model].add(host)
    return ran


def shards_of(log: str, host: str) -> list[int]:
    """The sizes of the shards of model lines ``host`` was given, in order."""
    return [int(n) for n, model in re.findall(rf"host {host}: (\d+) lines of (\S+)", log) if model in MODELS]


def test_a_job_runs_on_every_host_exactly_once(ray_node: RayNode, tmp_path: Path) -> None:
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(input_path, 40, max_tokens=8)
    env = {**server_env(), **RAY_ENV}
    started = time.time() - 1
    done = subprocess.run(
        batch_command(ray_node, input_path, output_path),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=JOB_SECONDS,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    check_output(output_path, ids)
    assert "batch done: 40 ok, 2 failed" in done.stdout
    # Both hosts took shards at the start (which model's shards each takes after that
    # is up to which host is free first).
    assert set().union(*hosts_per_model(done.stderr).values()) == set(HOSTS)
    # Metered into the home's ledger by the driver, one record per line that reached a model.
    check_ledger(TEST_HOME / "usage.sqlite3", output_path, started)
    # The per-model progress, from the results the driver accepted (not a terminal: log lines).
    for model in MODELS:
        assert f"batch: {model}: 20 lines to run" in done.stderr
        assert re.search(rf"batch: {model}: 20/20 lines, .* \(done\)", done.stderr), done.stderr[-4000:]

    # Run again: everything is in the output already; nothing runs, nothing is added.
    before = output_path.read_bytes()
    again = subprocess.run(
        batch_command(ray_node, input_path, output_path), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "42 already in the output" in again.stdout
    assert output_path.read_bytes() == before
    check_ledger(TEST_HOME / "usage.sqlite3", output_path, started)  # nothing ran: no record added


def test_a_lost_host_costs_only_its_unfinished_lines(ray_node: RayNode, tmp_path: Path) -> None:
    input_path, output_path, log_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "job.log"
    # Enough work that the job is far from done when the first results are in.
    ids = write_input(input_path, 160, max_tokens=48)
    ledger = tmp_path / "usage.sqlite3"  # a ledger of its own, as --ledger-url names one
    with log_path.open("w") as log:
        job = subprocess.Popen(
            batch_command(ray_node, input_path, output_path, "--ledger-url", f"sqlite://{ledger}"),
            env={**server_env(), **RAY_ENV},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + JOB_SECONDS
        # Kill host_a once it has finished a shard of model lines and started the next.
        while len(shards_of(log_path.read_text(), "host_a")) < 2:
            assert job.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.2)
        pids = {name: int(pid) for name, pid in re.findall(r"host (\S+) ready \(pid (\d+)\)", log_path.read_text())}
        victim = psutil.Process(pids["host_a"])
        os.kill(victim.pid, signal.SIGKILL)
        assert job.wait(JOB_SECONDS) == 0, log_path.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    log = log_path.read_text()
    (lost,) = re.findall(r"host host_a lost; (\d+) unfinished line\(s\) go to other hosts", log)
    # At most the shard it was running when killed: the one it had finished ran once.
    assert 1 <= int(lost) <= shards_of(log, "host_a")[1]
    check_output(output_path, ids)  # each line once: none lost, none run twice into the output
    # Recorded once too: the lost host's unfinished lines sent no result, so no record;
    # their re-runs on the other host are recorded as they are appended.
    check_ledger(ledger, output_path, 0.0)
    assert Ledger(ledger, writable=False).query(UsageFilter()).totals.requests == len(ids)
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
