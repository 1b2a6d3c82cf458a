"""The batch job's parts, in process: reading lines, the exactly-once result log, the
order models run in, progress, and ``v4serve batch``'s exit status when the job cannot run.

The engines are stand-ins (tests/in_process.py) behind the real pool and services; the
real engine and a real ``kill -9`` are tests/test_batch_cli.py's.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.batch.endpoints import Endpoints, Outcome
from server.batch.job import NO_MODEL, run_job
from server.batch.lines import BatchLine, InputChangedError, InputSpan, LineFault, check_lines, read_input
from server.batch.progress import Progress, summary
from server.batch.results import OutputBusyError, ResultLog, result_record
from server.batch.runner import HeldRecords, run_lines
from server.batch.store import RESULT_PURPOSE, BatchStore
from server.cli import main
from server.settings import Settings
from server.telemetry import Ledger, Telemetry, UsageFilter, UsageRecord
from tests.conftest import FIXTURES
from tests.in_process import cached_registry, serve_in_process


def raw(custom_id: Any, model: str = "tiny-llama", url: str = "/v1/completions", **extra: Any) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, "prompt": "a b"}, **extra}
    return json.dumps(line).encode() + b"\n"


def test_lines_that_cannot_run_are_faults_and_the_rest_are_requests() -> None:
    lines = [
        raw("a"),
        b"\n",  # blank lines are skipped, and still count for line numbers
        b"{oops\n",
        b"[1, 2]\n",
        json.dumps({"url": "/v1/completions", "body": {}}).encode(),
        raw(""),
        raw("x" * 513),
        raw("b", method="GET"),
        raw("c", url="/v1/embeddings"),
        raw("d", body=[1]),
        raw("a"),
        raw("e", url="/v4/completions"),
    ]
    checked = list(check_lines(lines))
    assert isinstance(checked[0], BatchLine) and checked[0].number == 1 and checked[0].model == "tiny-llama"
    faults = [(item.number, item.custom_id, item.code) for item in checked if isinstance(item, LineFault)]
    assert faults == [
        (3, None, "invalid_json_line"),
        (4, None, "invalid_request"),
        (5, None, "missing_custom_id"),
        (6, None, "missing_custom_id"),
        (7, None, "invalid_custom_id"),
        (8, "b", "invalid_method"),
        (9, "c", "invalid_url"),
        (10, "d", "invalid_body"),
        (11, "a", "duplicate_custom_id"),
    ]
    assert isinstance(checked[-1], BatchLine) and checked[-1].url == "/v4/completions"
    # The HTTP batch API holds every line to the batch's endpoint.
    (mismatch,) = check_lines([raw("e", url="/v4/completions")], endpoint="/v1/completions")
    assert isinstance(mismatch, LineFault) and mismatch.code == "mismatched_url"


def test_a_line_read_from_a_file_holds_where_it_is_not_its_body(tmp_path: Path) -> None:
    """A job keeps each line's place in the input, and reads the line again when it runs:
    its memory holds the lines in flight, not the whole file."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(raw("a") + b"\n" + raw("b", model="tiny-mpt", prompt_extra="x" * 1000) + b"{oops\n")
    first, second, fault = read_input(path)
    assert isinstance(first, BatchLine) and isinstance(second, BatchLine) and isinstance(fault, LineFault)
    assert isinstance(first.source, InputSpan) and isinstance(second.source, InputSpan)
    assert (first.number, first.model, second.number, second.model, fault.number) == (1, "tiny-llama", 3, "tiny-mpt", 4)
    assert second.body == {"model": "tiny-mpt", "prompt": "a b"}
    assert second.raw() == raw("b", model="tiny-mpt", prompt_extra="x" * 1000)
    # A host on another machine gets the bytes themselves.
    carried = second.carried()
    assert carried.source == second.raw() and carried.body == second.body
    # A file changed under a running job is an error, not another request run in its place.
    path.write_bytes(raw("z") + b"\n" + raw("y", model="tiny-mpt", prompt_extra="x" * 1000))
    with pytest.raises(InputChangedError, match="line 3 of the input changed"):
        second.body  # noqa: B018


def record(custom_id: str | None, status: int | None = 200, line: int | None = None) -> dict[str, Any]:
    response = None if status is None else {"status_code": status, "request_id": "r", "body": {}}
    error = None if line is None else {"code": "invalid_json_line", "message": "m", "line": line}
    return {"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": error}


def test_the_result_log_cuts_a_torn_last_line_and_knows_what_is_answered(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    whole = [json.dumps(record("a")), json.dumps(record("b", 404)), json.dumps(record(None, None, 7))]
    # What a kill in the middle of a write leaves: the last line without its end.
    output.write_text("\n".join(whole) + "\n" + json.dumps(record("c"))[:25])
    log = ResultLog(output)
    try:
        answered = log.answered
        assert (answered.ran, answered.faults, answered.ok, answered.failed) == ({"a", "b"}, {7}, 1, 2)
        assert output.read_text() == "\n".join(whole) + "\n"
        assert answered.holds(BatchLine.of(1, "a", "/v1/completions", {}))
        assert not answered.holds(BatchLine.of(2, "c", "/v1/completions", {}))
        assert answered.holds(LineFault(7, None, "invalid_json_line", "m"))
        assert not answered.holds(LineFault(8, None, "invalid_json_line", "m"))
        log.write(record("c"))
        # A second job on the same output is refused while this one holds it.
        with pytest.raises(OutputBusyError):
            ResultLog(output)
    finally:
        log.close()
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == ["a", "b", None, "c"]
    ResultLog(output).close()  # free again once closed


def test_the_http_batch_api_log_splits_successes_from_failures(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "ok.jsonl", tmp_path / "errors.jsonl")
    for item in (record("a"), record("b", 400), record(None, None, 3)):
        log.write(item)
    log.close()
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "ok.jsonl").read_text().splitlines()] == ["a"]
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 2
    again = ResultLog(tmp_path / "ok.jsonl", tmp_path / "errors.jsonl")
    assert (again.answered.ran, again.answered.faults) == ({"a", "b"}, {3})
    again.close()


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def model_started(self, model: str, total: int) -> None:
        self.events.append(("start", (model, total)))

    def line_done(self, ok: bool, completion_tokens: int) -> None:
        self.events.append(("line", (ok, completion_tokens)))

    def model_finished(self) -> None:
        self.events.append(("end", None))


async def test_a_job_loads_each_engine_once_loaded_ones_first_and_resumes(tmp_path: Path) -> None:
    """Lines for tiny-c, tiny-a (loaded), an unknown model, tiny-b, mixed in the input:
    the unknown model's run first (no load), then tiny-a's, then the others as first named.
    A second run over the same output runs nothing."""
    registry = cached_registry(FIXTURES / "multi_overlay.yaml")
    models = ["tiny-c", "tiny-a", "nope", "tiny-b"] * 3
    lines = [raw(f"{model}-{i}", model) for i, model in enumerate(models)] + [b"{torn\n"]
    items = list(check_lines(lines))
    async with serve_in_process(tmp_path, registry=registry, preload=["tiny-a"]) as server:
        state = server.app.state.v4
        endpoints = Endpoints(state.service, state.chat)
        seen = Seen()
        log = ResultLog(tmp_path / "out.jsonl")
        done = await run_job(items, log, pool=state.pool, endpoints=endpoints, observer=seen)
        log.close()
        assert [event for kind, event in seen.events if kind == "start"] == [
            (NO_MODEL, 3),
            ("tiny-a", 3),
            ("tiny-c", 3),
            ("tiny-b", 3),
        ]
        assert (done.ok, done.failed, done.skipped) == (9, 4, 0)
        assert done.completion_tokens == 9 * 16  # the /v1 default max_tokens, one token a step
        # Each engine started once, for its own lines.
        assert sorted(server.engines) == ["tiny-a", "tiny-b", "tiny-c"]
        assert all(len(engine.prepared) == 3 for engine in server.engines.values())

        log = ResultLog(tmp_path / "out.jsonl")
        again = await run_job(items, log, pool=state.pool, endpoints=endpoints)
        log.close()
        assert (again.ok, again.failed, again.skipped) == (0, 0, 13)
        assert all(len(engine.prepared) == 3 for engine in server.engines.values())
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 13
    ran = [r["custom_id"] for r in records if r["response"]]
    assert sorted(ran) == sorted(f"{model}-{i}" for i, model in enumerate(models))


async def test_a_metered_job_records_every_line_that_reached_a_model_with_its_status(tmp_path: Path) -> None:
    """Each line that names a served model is one usage record and one request in the
    metrics, whatever its outcome, marked as a batch's; lines refused before a model is
    known (unknown model, bad JSON) have none, as HTTP requests refused there have none."""
    overflow = {"model": "tiny-llama", "prompt": " ".join(["w"] * 3000), "max_tokens": 3}
    items = list(
        check_lines(
            [raw("ok-0"), raw("ok-1"), raw("ok-2"), raw("too-long", body=overflow), raw("gone", "nope"), b"{torn\n"]
        )
    )
    location = tmp_path / "usage.sqlite3"
    telemetry = Telemetry(ledger=Ledger(location))
    async with serve_in_process(tmp_path / "home", preload=["tiny-llama"]) as server:
        state = server.app.state.v4
        log = ResultLog(tmp_path / "out.jsonl")
        done = await run_job(
            items, log, pool=state.pool, endpoints=Endpoints(state.service, state.chat), telemetry=telemetry
        )
        log.close()
    telemetry.close()
    assert (done.ok, done.failed) == (3, 3)
    outputs = {
        r["custom_id"]: r["response"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    }
    assert outputs["too-long"]["status_code"] == 400 and outputs["gone"]["status_code"] == 404

    rows = Ledger(location, writable=False).query(UsageFilter()).rows
    by_id = {row.request_id: row for row in rows}
    assert len(rows) == len(by_id) == 4
    # A record is the line's own: its request ID is the one in the output line.
    for custom_id, status, prompt, completion in (("ok-0", 200, 3, 16), ("ok-2", 200, 3, 16), ("too-long", 400, 0, 0)):
        row = by_id[outputs[custom_id]["request_id"]]
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (status, prompt, completion)
        assert (row.model, row.route, row.source, row.key_name, row.account) == (
            "tiny-llama",
            "/v1/completions",
            "batch",
            "batch",
            None,
        )
    assert outputs["gone"]["request_id"] not in by_id
    metrics = telemetry.metrics.registry
    for name in ("v4serve_requests_total", "v4serve_batch_lines_total"):
        labels = {"model": "tiny-llama", "route": "/v1/completions"}
        assert metrics.get_sample_value(name, {**labels, "status": "200"}) == 3
        assert metrics.get_sample_value(name, {**labels, "status": "400"}) == 1
    assert metrics.get_sample_value("v4serve_generation_tokens_total", {"model": "tiny-llama"}) == 3 * 16


async def test_held_records_are_the_records_the_local_job_writes(tmp_path: Path) -> None:
    """A Ray host meters its lines with ``HeldRecords``: each answered line's record is
    the one the local job's ``Telemetry`` writes for the same line (same model, route,
    tokens, status, key name, source), under the output line's request ID, handed over
    once; a line refused before a model is known has none."""
    overflow = {"model": "tiny-llama", "prompt": " ".join(["w"] * 3000), "max_tokens": 3}
    checked = check_lines([raw("ok"), raw("too-long", body=overflow), raw("gone", "nope")])
    lines = [item for item in checked if isinstance(item, BatchLine)]
    location = tmp_path / "usage.sqlite3"
    local = Telemetry(ledger=Ledger(location))
    held = HeldRecords()
    handed: dict[str, tuple[Outcome, UsageRecord | None]] = {}
    async with serve_in_process(tmp_path / "home", preload=["tiny-llama"]) as server:
        endpoints = Endpoints(server.app.state.v4.service, server.app.state.v4.chat)
        local_ids: dict[str, str] = {}
        await run_lines(
            lines,
            endpoints,
            lambda line, outcome: local_ids.__setitem__(line.custom_id, outcome.request_id),
            concurrency=3,
            telemetry=local,
        )

        def on_result(line: BatchLine, outcome: Outcome) -> None:
            handed[line.custom_id] = (outcome, held.take(outcome.request_id))

        await run_lines(lines, endpoints, on_result, concurrency=3, telemetry=held)
    local.close()
    written = {row.request_id: row for row in Ledger(location, writable=False).query(UsageFilter()).rows}
    assert set(handed) == {"ok", "too-long", "gone"} and len(written) == 2
    for custom_id, status in (("ok", 200), ("too-long", 400)):
        outcome, record = handed[custom_id]
        assert record is not None and outcome.status == status
        assert record.request_id == outcome.request_id == result_record(lines[0], outcome)["response"]["request_id"]
        assert held.take(outcome.request_id) is None  # handed over once
        mine = (record.model, record.route, record.prompt_tokens, record.completion_tokens, record.status)
        theirs = written[local_ids[custom_id]]
        assert mine == (theirs.model, theirs.route, theirs.prompt_tokens, theirs.completion_tokens, theirs.status)
        assert (
            (record.key_name, record.source, record.account)
            == (theirs.key_name, theirs.source, None)
            == (
                "batch",
                "batch",
                None,
            )
        )
        assert record.duration > 0
    assert handed["ok"][1] is not None and handed["ok"][1].completion_tokens == 16
    assert handed["gone"][0].status == 404 and handed["gone"][1] is None


async def test_the_ray_driver_records_each_result_it_appends_once(tmp_path: Path) -> None:
    """The Ray driver commits a result's usage record and appends the result; a result the
    output holds already (a repeat, or one a previous run appended) is dropped with its
    record, so the ledger has one record per output line. Ray is imported, not started."""
    from server.batch.ray_job import LineResult, RayJob

    def result(custom_id: str, usage: bool) -> LineResult:
        outcome = Outcome(200, {}, 1, 2, request_id=f"req-{custom_id}")
        line = BatchLine.of(1, custom_id, "/v1/completions", {"model": "m"})
        record = (
            UsageRecord(1.0, outcome.request_id, None, "batch", "m", line.url, 1, 2, 200, 0.1, "batch")
            if usage
            else None
        )
        return LineResult(custom_id, result_record(line, outcome), True, 2, record)

    ledger = Ledger(tmp_path / "usage.sqlite3")
    settings, registry = Settings(home=tmp_path), cached_registry()
    for attempt in range(2):  # the second run resumes over the same output
        log = ResultLog(tmp_path / "out.jsonl")
        job = RayJob(settings, registry, log, io.StringIO(), ledger)
        batch = [result("a", True), result("b", False), result("c", True)]
        accepted = await job.accept(batch[:2])
        accepted += await job.accept([result("a", True), *batch[1:]])
        log.close()
        assert [r.custom_id for r in accepted] == (["a", "b", "c"] if attempt == 0 else [])
    ledger.close()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    rows = Ledger(tmp_path / "usage.sqlite3", writable=False).query(UsageFilter()).rows
    assert sorted(row.request_id for row in rows) == ["req-a", "req-c"]


def test_a_ledger_made_before_records_had_a_source_gains_one(tmp_path: Path) -> None:
    """A server's existing ledger takes batch lines' records: its old records read as HTTP's."""
    location = tmp_path / "usage.sqlite3"
    old = sqlite3.connect(location)
    old.execute(
        "CREATE TABLE usage (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, request_id TEXT NOT NULL, "
        "account TEXT, key_name TEXT, model TEXT NOT NULL, route TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, status INTEGER NOT NULL, duration REAL NOT NULL)"
    )
    old.execute("INSERT INTO usage VALUES (1, 1.0, 'old', NULL, NULL, 'm', '/v4/completions', 1, 2, 200, 0.1)")
    old.commit()
    old.close()
    ledger = Ledger(location)
    ledger.write(UsageRecord(2.0, "new", None, "batch", "m", "/v1/completions", 1, 2, 200, 0.1, "batch")).result()
    ledger.close()
    reader = Ledger(location, writable=False)
    assert [(row.request_id, row.source) for row in reader.query(UsageFilter()).rows] == [
        ("new", "batch"),
        ("old", "http"),
    ]
    assert [row.request_id for row in reader.query(UsageFilter(source="http")).rows] == ["old"]


def test_the_command_records_usage_unless_told_not_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``v4serve batch`` opens the server's ledger under --home by default (a ledger it
    cannot open stops it before any line runs, exit 2); ``--no-ledger`` runs without."""
    (tmp_path / "in.jsonl").write_bytes(b"{torn\n")
    paths = [str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--home", str(tmp_path / "home")]
    assert main(["batch", *paths]) == 0
    assert (tmp_path / "home" / "usage.sqlite3").is_file()
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "a-directory").mkdir()
    unusable = ["--ledger-url", f"sqlite:///{tmp_path / 'a-directory'}"]
    assert main(["batch", *paths, *unusable]) == 2
    assert "cannot open the usage ledger" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()
    assert main(["batch", *paths, *unusable, "--no-ledger"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_progress_redraws_a_line_on_a_terminal_and_logs_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    terminal = io.StringIO()
    progress = Progress(terminal, tty=True, clock=lambda: now[0])
    progress.model_started("tiny-llama", 5)
    # The first answer comes after the engine's load (60 s); the rate counts from there.
    for step, at in enumerate((60.0, 61.0, 62.0)):
        now[0] = at
        progress.line_done(step != 1, 50)
    progress.model_finished()
    shown = terminal.getvalue()
    assert "\r\x1b[K" in shown and shown.endswith("\n")
    assert "tiny-llama: 0/5 lines, - tokens/s, ETA -" in shown
    assert "tiny-llama: 1/5 lines, - tokens/s, ETA -" in shown
    assert "tiny-llama: 2/5 lines, 1 failed, 50 tokens/s, ETA 0:00:03" in shown
    assert "tiny-llama: 3/5 lines, 1 failed, 50 tokens/s, ETA 0:00:02" in shown

    with caplog.at_level(logging.INFO, logger="server.batch"):
        plain = Progress(io.StringIO(), tty=False, clock=lambda: now[0])
        plain.model_started("tiny-llama", 2)
        plain.line_done(True, 5)
        plain.line_done(True, 5)
        plain.model_finished()
    messages = [r.getMessage() for r in caplog.records if r.name == "server.batch"]
    assert messages[0] == "batch: tiny-llama: 2 lines to run"
    assert messages[-1].startswith("batch: tiny-llama: 2/2 lines") and messages[-1].endswith("(done)")
    assert summary(8, 2, 5, 1000, 10.0) == (
        "batch done: 8 ok, 2 failed, 5 already in the output; 1,000 output tokens in 0:00:10 (100 tokens/s)"
    )


def test_progress_shows_the_models_running_at_once_on_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A job on Ray runs several models at once and names the model of each event: they
    share the live line, and each is left as a finished line when it is done."""
    now = [0.0]
    terminal = io.StringIO()
    progress = Progress(terminal, tty=True, clock=lambda: now[0])
    progress.model_started("a", 2)
    progress.model_started("b", 3)
    for at, model in ((1.0, "b"), (2.0, "a"), (3.0, "b"), (4.0, "a")):
        now[0] = at
        progress.line_done(True, 10, model)
    progress.model_finished("a")
    shown = terminal.getvalue()
    assert "\r\x1b[Ka: 0/2 lines, - tokens/s, ETA - | b: 0/3 lines, - tokens/s, ETA -" in shown
    assert "a: 1/2 lines, - tokens/s, ETA - | b: 2/3 lines, 5 tokens/s, ETA 0:00:02" in shown
    # "a" is done: its line stays, and the live line goes on with "b" alone (its rate
    # and ETA measured up to now).
    assert shown.endswith("\r\x1b[Ka: 2/2 lines, 5 tokens/s, ETA -\n\r\x1b[Kb: 2/3 lines, 3 tokens/s, ETA 0:00:03")

    with caplog.at_level(logging.INFO, logger="server.batch"):
        plain = Progress(io.StringIO(), tty=False, clock=lambda: now[0])
        plain.model_started("a", 1)
        plain.model_started("b", 1)
        plain.line_done(True, 5, "a")
        plain.model_finished("a")
    messages = [r.getMessage() for r in caplog.records if r.name == "server.batch"]
    assert messages[-1] == "batch: a: 1/1 lines, - tokens/s, ETA - (done)"


def test_the_command_exits_2_only_when_it_cannot_read_its_input_or_write_its_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path)]
    assert main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"), *home]) == 2
    assert "cannot read" in capsys.readouterr().err
    # A line that is not text is a bad line, not a bad job: it is answered, and the job ends well.
    (tmp_path / "in.jsonl").write_bytes(b"\xff\xfe not utf-8 \n")
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), *home]) == 0
    (fault,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert fault["error"]["code"] == "invalid_json_line" and fault["error"]["line"] == 1
    (tmp_path / "in.jsonl").write_bytes(raw("a"))
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path), *home]) == 2
    assert "cannot write" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "locked" / "out.jsonl"), *home]) == 2


def test_a_growing_result_file_is_served_as_far_as_its_last_whole_line(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    result = store.add_file(b"", "batch_output.jsonl", RESULT_PURPOSE, None)
    store.content_path(result.id).write_bytes(b'{"a": 1}\n{"b": 2}\n{"c"')  # a line being appended
    assert store.content(result) == b'{"a": 1}\n{"b": 2}\n'
    upload = store.add_file(b'{"x": 1}', "in.jsonl", "batch", None)  # an input needs no final newline
    assert store.content(upload) == b'{"x": 1}'
