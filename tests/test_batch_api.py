"""The Files and Batch APIs (``/v1/files``, ``/v1/batches``) in process, with stand-in engines.

The OpenAI SDK uploads, creates, polls and downloads as a user's script would; every bad
input gets its status and JSON error; a batch line is answered exactly as its HTTP route
answers the same body; cancelling stops a batch; a batch running when the server stops
resumes when it starts again and ends with each line exactly once; batch lines yield to
interactive requests. The last test runs the SDK's flow against the real server and engine
(``slow``), across a restart.

Requests whose prompt holds the word ``hold`` wait in the engine for a ticket
(``Held``), so a test decides when each finishes; everything else it proves by counts
(lines in the result files, requests the engine saw), never by timing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.engines.base import GenerationDelta, PreparedRequest
from tests.conftest import ACCOUNT, API_KEY, FIXTURES, OTHER_KEY, start_server
from tests.in_process import BASE_URL, InProcessServer, StandInEngine, cached_registry, serve_in_process
from tests.test_metrics import scrape, value

MODEL = "tiny-llama"
NARROW = "tiny-narrow"  # tests/fixtures/batch_overlay.yaml: two requests at a time
# Generous: a safety net for a hung test, never what a result depends on.
WAIT_SECONDS = 60.0


def sdk(server: InProcessServer, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(server.app))
    return openai.AsyncOpenAI(api_key=api_key, base_url=f"{BASE_URL}/v1", max_retries=0, http_client=http)


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines).encode()


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in text.splitlines()]


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for ``predicate`` to hold (it reads counters); fail after ``WAIT_SECONDS``."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), WAIT_SECONDS)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


async def finished(client: openai.AsyncOpenAI, batch_id: str) -> Any:
    """The batch once it is in a final state."""
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.01)


class Held:
    """Makes ``engine`` hold every request whose prompt has the word ``hold`` until the test
    hands it a ticket; records the prompts in the order they reached the engine."""

    def __init__(self, engine: StandInEngine):
        self.tickets = asyncio.Semaphore(0)
        self.started: list[str] = []
        self.waiting = 0
        original = engine.generate

        async def generate(
            request: PreparedRequest, request_id: str, *, stream: bool = True
        ) -> AsyncGenerator[GenerationDelta, None]:
            prompt = str(request.engine_input)
            self.started.append(prompt)
            if "hold" in prompt.split():
                self.waiting += 1
                try:
                    await self.tickets.acquire()
                finally:
                    self.waiting -= 1
            async for delta in original(request, request_id, stream=stream):
                yield delta

        engine.generate = generate  # type: ignore[method-assign]


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncGenerator[InProcessServer, None]:
    async with serve_in_process(tmp_path, preload=[MODEL], batch_dir=tmp_path / "batches") as running:
        yield running


# ----- the SDK's flow ----------------------------------------------------------------------


async def test_the_sdk_uploads_runs_polls_and_downloads_a_batch(serving: InProcessServer) -> None:
    good = [line(f"ok-{i}", {"model": MODEL, "prompt": f"a b {i}", "max_tokens": 3}) for i in range(3)]
    data = jsonl(
        *good,
        "{not json",
        line("unknown", {"model": "no-such-model", "prompt": "x"}),
        line("bad-field", {"model": MODEL, "prompt": "x", "max_tokens": -1}),
        line("other-url", {"model": MODEL, "messages": []}, url="/v1/chat/completions"),
    )
    async with sdk(serving) as client:
        upload = await client.files.create(file=("requests.jsonl", data), purpose="batch")
        assert (upload.object, upload.purpose, upload.bytes, upload.filename) == (
            "file",
            "batch",
            len(data),
            "requests.jsonl",
        )
        assert (await client.files.retrieve(upload.id)).id == upload.id
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h", metadata={"run": "1"}
        )
        assert created.status in ("validating", "in_progress") and created.metadata == {"run": "1"}
        batch = await finished(client, created.id)
        assert batch.status == "completed", batch
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 3, 4)
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
        assert batch.output_file_id and batch.error_file_id
        output = records((await client.files.content(batch.output_file_id)).text)
        errors = records((await client.files.content(batch.error_file_id)).text)
        assert (await client.files.retrieve(batch.output_file_id)).purpose == "batch_output"
        listed = await client.batches.list()
        assert [b.id for b in listed.data] == [created.id]
    # Each line exactly once: successes in the output file, the rest in the error file.
    assert sorted(r["custom_id"] for r in output) == ["ok-0", "ok-1", "ok-2"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in output)
    by_id = {r["custom_id"]: r for r in errors}
    assert by_id["unknown"]["response"]["status_code"] == 404
    assert by_id["bad-field"]["response"]["status_code"] == 400
    assert by_id["bad-field"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert by_id["other-url"]["response"] is None and by_id["other-url"]["error"]["code"] == "mismatched_url"
    assert by_id[None]["error"] == {"code": "invalid_json_line", "message": by_id[None]["error"]["message"], "line": 4}
    # A line's body is the route's answer to the same request.
    async with serving.client() as http:
        direct = (await http.post("/v1/completions", json=good[0]["body"])).json()
    response = next(r for r in output if r["custom_id"] == "ok-0")["response"]
    answered = response["body"]
    # Each line is a request of its own, with its own ID (the engine request's is made from it).
    assert answered["id"] == f"cmpl-{response['request_id']}"
    assert len({r["response"]["request_id"] for r in output + errors if r["response"]}) == 5
    ignore = {"id", "created"}
    assert {k: v for k, v in answered.items() if k not in ignore} == {
        k: v for k, v in direct.items() if k not in ignore
    }


async def test_every_line_is_metered_as_an_http_request_is(serving: InProcessServer) -> None:
    """A batch's lines reach the usage ledger (its account's, read back with ``GET /v4/usage``)
    and ``/metrics`` as the same requests over HTTP would: one record and one count per line
    that named a served model, failed ones with their status; a line refused before (an
    unknown model) has neither, as over HTTP. ``v4serve_batch_lines_total`` counts only them."""
    lines = 4
    good = [line(f"ok-{i}", {"model": MODEL, "prompt": f"a b {i}", "max_tokens": 2}) for i in range(lines)]
    too_long = line("too-long", {"model": MODEL, "prompt": "a " * 3000, "max_tokens": 2})
    unknown = line("unknown", {"model": "no-such-model", "prompt": "x"})
    counted = {"model": MODEL, "route": "/v1/completions"}
    before = await scrape(serving)
    async with sdk(serving) as client, serving.client() as http:
        assert (await http.post("/v1/completions", json=good[0]["body"])).status_code == 200  # not a batch's
        upload = await client.files.create(file=("m.jsonl", jsonl(*good, too_long, unknown)), purpose="batch")
        created = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        batch = await finished(client, created.id)
        assert batch.output_file_id and batch.error_file_id
        answered = records((await client.files.content(batch.output_file_id)).text)
        answered += records((await client.files.content(batch.error_file_id)).text)
        usage = (await http.get("/v4/usage", params={"model": MODEL})).json()
    after = await scrape(serving)

    response = {r["custom_id"]: r["response"] for r in answered}
    batch_rows = [row for row in usage["rows"] if row["source"] == "batch"]
    assert {row["key_name"] for row in batch_rows} == {"batch"}
    assert [row["source"] for row in usage["rows"]].count("http") == 1
    assert sorted(row["request_id"] for row in batch_rows) == sorted(
        response[custom_id]["request_id"] for custom_id in [*(g["custom_id"] for g in good), "too-long"]
    )
    assert usage["totals"]["requests"] == lines + 2  # the batch's lines and the HTTP request
    by_id = {row["request_id"]: row for row in batch_rows}
    assert by_id[response["too-long"]["request_id"]]["status"] == 400
    for row in batch_rows:
        assert (row["account_id"], row["route"]) == (ACCOUNT, "/v1/completions")
        assert row["completion_tokens"] == (2 if row["status"] == 200 else 0)

    def grew(name: str, status: str) -> float:
        return value(after, name, **counted, status=status) - value(before, name, **counted, status=status)

    assert grew("v4serve_requests_total", "200") == lines + 1
    assert grew("v4serve_requests_total", "400") == 1
    assert grew("v4serve_batch_lines_total", "200") == lines
    assert grew("v4serve_batch_lines_total", "400") == 1
    assert value(after, "v4serve_requests_total", model="no-such-model", route="/v1/completions", status="404") == 0


BAD_BODIES = [
    ("/v1/completions", {"model": MODEL}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": "hot"}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "nonsense": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "a"}),
    ("/v1/completions", {"model": MODEL, "prompt": "a " * 3000, "max_tokens": 5}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "nobody", "content": "x"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    ("/v4/completions", {"model": MODEL}),
    ("/v4/completions", {"model": MODEL, "prompt": "a", "model_parameters": {"temperature": -1}}),
    ("/v4/completions", {"model": "no-such-model", "prompt": "a"}),
    ("/v4/chat-completions", {"model": MODEL, "messages": "hello"}),
]


async def test_a_bad_line_fails_exactly_as_its_http_route_fails(serving: InProcessServer) -> None:
    """Status and error body of every bad body, in a batch and over HTTP, are the same."""
    by_url: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for index, (url, body) in enumerate(BAD_BODIES):
        by_url.setdefault(url, []).append((f"bad-{index}", body))
    async with sdk(serving) as client, serving.client() as http:
        for url, bodies in by_url.items():
            upload = await client.files.create(
                file=("bad.jsonl", jsonl(*(line(cid, body, url) for cid, body in bodies))), purpose="batch"
            )
            batch = await client.batches.create(input_file_id=upload.id, endpoint=url, completion_window="24h")  # type: ignore[arg-type]
            batch = await finished(client, batch.id)
            assert batch.output_file_id is None and batch.error_file_id, batch
            answered = {
                r["custom_id"]: r["response"] for r in records((await client.files.content(batch.error_file_id)).text)
            }
            for custom_id, body in bodies:
                direct = await http.post(url, json=body)
                # Each carries its own request's ID; the rest is the same.
                batch_error = answered[custom_id]["body"]["error"]
                assert batch_error.pop("request_id") == answered[custom_id]["request_id"]
                direct_error = direct.json()["error"]
                assert direct_error.pop("request_id") == direct.headers["x-request-id"]
                assert (answered[custom_id]["status_code"], batch_error) == (direct.status_code, direct_error), (
                    url,
                    body,
                )


async def test_stream_is_refused_in_a_batch(serving: InProcessServer) -> None:
    async with sdk(serving) as client:
        upload = await client.files.create(
            file=("s.jsonl", jsonl(line("s", {"model": MODEL, "prompt": "a", "stream": True}))), purpose="batch"
        )
        batch = await finished(
            client,
            (
                await client.batches.create(
                    input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
                )
            ).id,
        )
        assert batch.error_file_id is not None
        (record,) = records((await client.files.content(batch.error_file_id)).text)
    assert record["response"]["status_code"] == 400
    assert record["response"]["body"]["error"]["param"] == "stream"


# ----- bad inputs ----------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param, error


async def test_bad_requests_get_their_status_and_json_error(serving: InProcessServer) -> None:
    async with serving.client() as http:
        upload = lambda purpose, data=b"{}\n": http.post(  # noqa: E731
            "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose}
        )
        assert_error(await upload("fine-tune"), 400, "purpose")
        assert_error(await upload("batch", b" \n"), 400, "file")
        assert_error(await http.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")}), 400, "purpose")
        assert_error(await http.post("/v1/files", data={"purpose": "batch"}), 400, "file")
        assert_error(await http.post("/v1/files", content=b"not multipart"), 400)
        good = (await upload("batch", jsonl(line("a", {"model": MODEL, "prompt": "a", "max_tokens": 1})))).json()

        unknown_file = "file-" + "0" * 32
        assert_error(await http.get(f"/v1/files/{unknown_file}"), 404, "file_id")
        assert_error(await http.get(f"/v1/files/{unknown_file}/content"), 404, "file_id")
        assert_error(await http.get("/v1/files/..%2F..%2Fetc%2Fpasswd"), 404)
        assert_error(await http.get("/v1/batches/batch_nope"), 404, "batch_id")

        def create(**fields: Any) -> Any:
            body = {"input_file_id": good["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
            return http.post("/v1/batches", json={**body, **fields})

        assert_error(await create(input_file_id=unknown_file), 404, "input_file_id")
        assert_error(await create(endpoint="/v1/embeddings"), 400, "endpoint")
        assert_error(await create(completion_window="1h"), 400, "completion_window")
        assert_error(await create(metadata={str(i): "x" for i in range(17)}), 400, "metadata")
        assert_error(await http.post("/v1/batches", json={"endpoint": "/v1/completions"}), 400)
        assert_error(await http.post("/v1/batches", content=b"{", headers={"content-type": "application/json"}), 400)

        batch = (await create()).json()
        async with sdk(serving) as client:
            done = await finished(client, batch["id"])
        # A result file is no batch input.
        assert_error(await create(input_file_id=done.output_file_id), 400, "input_file_id")
        # An ended batch cannot be cancelled.
        assert_error(await http.post(f"/v1/batches/{batch['id']}/cancel"), 409)

    # Another account sees none of it; no key is 401.
    async with serving.client(api_key=OTHER_KEY) as other:
        assert_error(await other.get(f"/v1/files/{good['id']}"), 404)
        assert_error(await other.get(f"/v1/batches/{batch['id']}"), 404)
        assert_error(await other.post(f"/v1/batches/{batch['id']}/cancel"), 404)
        assert (await other.get("/v1/batches")).json()["data"] == []
    async with serving.client(api_key=None) as anonymous:
        assert_error(await anonymous.get("/v1/batches"), 401)
        assert_error(await anonymous.post("/v1/files", files={"file": ("a", b"{}")}, data={"purpose": "batch"}), 401)
    # And the server keeps serving.
    async with serving.client() as http:
        assert (await http.get("/v1/batches")).status_code == 200


async def test_an_upload_over_the_body_limit_is_413(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, batch_dir=tmp_path / "batches", max_body_bytes=1000) as server:
        async with server.client() as http:
            response = await http.post(
                "/v1/files", files={"file": ("big.jsonl", b"x" * 2000)}, data={"purpose": "batch"}
            )
            assert_error(response, 413)
            assert (await http.get("/v1/files")).json()["data"] == []


async def test_batches_are_listed_newest_first_a_page_at_a_time(serving: InProcessServer) -> None:
    async with sdk(serving) as client:
        upload = await client.files.create(
            file=("a.jsonl", jsonl(line("a", {"model": MODEL, "prompt": "a", "max_tokens": 1}))), purpose="batch"
        )
        ids = []
        for _ in range(3):
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
            )
            ids.append(batch.id)
            await finished(client, batch.id)
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
        rest = await client.batches.list(limit=2, after=first.data[-1].id)
        assert [b.id for b in rest.data] == ids[:1] and not rest.has_more


# ----- cancel, restart, priority ------------------------------------------------------------


async def test_cancel_stops_a_running_batch_and_keeps_what_finished(serving: InProcessServer) -> None:
    held = Held(serving.engines[MODEL])
    data = jsonl(
        line("free", {"model": MODEL, "prompt": "a", "max_tokens": 2}),
        *(line(f"held-{i}", {"model": MODEL, "prompt": "hold", "max_tokens": 2}) for i in range(3)),
    )
    async with sdk(serving) as client:
        upload = await client.files.create(file=("c.jsonl", data), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        await until(lambda: held.waiting == 3, "the three held lines are in the engine")
        while (await client.batches.retrieve(batch.id)).request_counts.completed < 1:
            await asyncio.sleep(0.01)
        cancelled = await client.batches.cancel(batch.id)
        assert cancelled.status == "cancelled" and cancelled.cancelling_at and cancelled.cancelled_at
        assert (cancelled.request_counts.completed, cancelled.request_counts.failed) == (1, 0)
        # The held lines left the engine, and nothing of theirs was written.
        assert held.waiting == 0
        assert cancelled.output_file_id and cancelled.error_file_id is None
        assert [r["custom_id"] for r in records((await client.files.content(cancelled.output_file_id)).text)] == [
            "free"
        ]
        held.tickets.release()
        assert (await client.batches.retrieve(batch.id)).status == "cancelled"
        assert (await client.batches.cancel(batch.id)).status == "cancelled"
    # Each line cut off is in the ledger as abandoned (499), the finished one as answered.
    async with serving.client() as http:
        usage = (await http.get("/v4/usage", params={"model": MODEL})).json()
    assert sorted(row["status"] for row in usage["rows"] if row["key_name"] == "batch") == [200, 499, 499, 499]


async def test_a_batch_running_when_the_server_stops_resumes_when_it_starts(tmp_path: Path) -> None:
    batches = tmp_path / "batches"
    free = [line(f"free-{i}", {"model": MODEL, "prompt": f"a {i}", "max_tokens": 2}) for i in range(5)]
    held_lines = [line(f"held-{i}", {"model": MODEL, "prompt": f"hold {i}", "max_tokens": 2}) for i in range(3)]
    async with serve_in_process(tmp_path, preload=[MODEL], batch_dir=batches) as first:
        held = Held(first.engines[MODEL])
        async with sdk(first) as client:
            upload = await client.files.create(file=("r.jsonl", jsonl(*free, *held_lines)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
            )
            await until(lambda: held.waiting == 3, "the held lines are in the engine")
            # The free lines run beside them: wait until their five results are written.
            while (running := await client.batches.retrieve(batch.id)).request_counts.completed < 5:
                await asyncio.sleep(0.01)
            assert (running.status, running.request_counts.completed) == ("in_progress", 5)
    # The server stopped mid-batch: the batch is still in progress on disk.
    saved = json.loads((batches / "batches" / f"{batch.id}.json").read_text())
    assert saved["batch"]["status"] == "in_progress"

    async with serve_in_process(tmp_path, preload=[MODEL], batch_dir=batches) as second:
        async with sdk(second) as client:
            done = await finished(client, batch.id)
            assert done.status == "completed", done
            assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 8, 0)
            output = records((await client.files.content(done.output_file_id or "")).text)
        # Only the three lines that had not finished ran again.
        assert sorted(str(p.engine_input) for p in second.engines[MODEL].prepared) == [f"hold {i}" for i in range(3)]
    custom_ids = [r["custom_id"] for r in output]
    assert sorted(custom_ids) == sorted(item["custom_id"] for item in free + held_lines)
    assert len(custom_ids) == len(set(custom_ids)) == 8


async def test_batch_lines_yield_to_interactive_requests(tmp_path: Path) -> None:
    """``tiny-narrow`` runs two requests and queues two. Two batch lines run (a batch never
    takes more than a model's running slots) and two interactive requests queue. When a
    line ends, the next batch line waits while a request is queued instead of queueing
    itself, so a third interactive request still finds room in the queue (else: 429)."""
    registry = cached_registry(FIXTURES / "batch_overlay.yaml")
    async with serve_in_process(
        tmp_path, registry=registry, preload=[NARROW], batch_dir=tmp_path / "batches", batch_max_running=8
    ) as server:
        held = Held(server.engines[NARROW])
        state = server.app.state.v4
        data = jsonl(*(line(f"b{i}", {"model": NARROW, "prompt": f"hold b{i}", "max_tokens": 1}) for i in range(4)))

        def queued() -> int:
            return next(status.queued for status in state.pool.status() if status.model_id == NARROW)

        async with sdk(server) as client, server.client() as http:

            def interactive(name: str) -> asyncio.Future[httpx.Response]:
                body = {"model": NARROW, "prompt": f"hold {name}", "max_tokens": 1}
                return asyncio.ensure_future(http.post("/v1/completions", json=body))

            upload = await client.files.create(file=("p.jsonl", data), purpose="batch")
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
            )
            await until(lambda: held.waiting == 2, "two batch lines run")
            first, second = interactive("A"), interactive("C")
            await until(lambda: queued() == 2, "two interactive requests queue")
            held.tickets.release()  # b0 ends; A takes its slot; C still waits
            await until(lambda: state.batches.priority.yielded == 1, "the next batch line yields")
            assert held.waiting == 2 and queued() == 1
            third = interactive("D")
            await until(lambda: queued() == 2, "a third interactive request finds room in the queue")
            assert not third.done()
            for _ in range(6):
                held.tickets.release()
            assert [(await request).status_code for request in (first, second, third)] == [200, 200, 200]
            done = await finished(client, batch.id)
    assert done.request_counts.completed == 4
    assert held.started[:5] == ["hold b0", "hold b1", "hold A", "hold C", "hold D"]
    assert sorted(held.started[5:]) == ["hold b2", "hold b3"]


# ----- the real server --------------------------------------------------------------------


@pytest.mark.slow
def test_the_sdk_runs_a_batch_on_the_real_server_across_a_restart(tmp_path: Path) -> None:
    """``v4serve serve`` with the real engine: the SDK uploads and creates two batches, one
    is cancelled, the server is stopped while the other waits for its model to load, and
    the next server finishes it, each line exactly once."""
    batch_dir = tmp_path / "batches"
    extra = ["--batch-dir", str(batch_dir)]
    good = [
        line(f"c{i}", {"model": MODEL, "prompt": f"line {i}", "max_tokens": 8, "ignore_eos": True}) for i in range(40)
    ]
    data = jsonl(*good, line("unknown", {"model": "no-such-model", "prompt": "x"}))

    def client_of(server: Any) -> openai.OpenAI:
        return openai.OpenAI(api_key=API_KEY, base_url=f"{server.base_url}/v1", max_retries=0, timeout=120)

    first = start_server(tmp_path / "first", extra_args=extra)  # nothing preloaded: the lines wait for a load
    try:
        client = client_of(first)
        upload = client.files.create(file=("requests.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        doomed = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        assert client.batches.cancel(doomed.id).status == "cancelled"
    finally:
        first.stop()
    assert json.loads((batch_dir / "batches" / f"{doomed.id}.json").read_text())["batch"]["status"] == "cancelled"

    second = start_server(tmp_path / "second", extra_args=extra)
    try:
        client = client_of(second)
        deadline = time.monotonic() + 900
        while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (41, 40, 1)
        output = records(client.files.content(done.output_file_id or "").text)
        errors = records(client.files.content(done.error_file_id or "").text)
        assert client.batches.retrieve(doomed.id).status == "cancelled"
    finally:
        second.stop()
    assert sorted(r["custom_id"] for r in output) == sorted(item["custom_id"] for item in good)
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 8 for r in output)
    assert [(r["custom_id"], r["response"]["status_code"]) for r in errors] == [("unknown", 404)]
