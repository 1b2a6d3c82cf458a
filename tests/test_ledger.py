"""The usage ledger: one committed record per generation request, and who may read them.

In process (tests/in_process.py) with stand-in engines, whose token counts are known in
advance (one prompt token a word plus one, ``max_tokens`` completion tokens). That an
answered request's record survives ``kill -9``: an answer's last byte waits for its
record's commit (``test_the_last_byte_waits_for_the_commit``), a committed record survives
its writer's SIGKILL (``test_a_committed_record_survives_kill_9``), and the real server
killed under load loses none (tests/test_metrics_real_server.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.api import state_of
from server.cli import main as cli_main
from server.telemetry import Ledger, UsageFilter, UsageRecord
from tests.conftest import ACCOUNT, API_KEY, API_KEYS, OTHER_KEY
from tests.in_process import InProcessServer, asgi_post_scope, serve_in_process

ADMIN_KEY = "admin-key"
KEYS = f"{API_KEYS},{ADMIN_KEY}::admin"


def v4(max_tokens: int, *, stream: bool = False, account: str | None = None) -> dict:
    body: dict = {"model": "tiny-llama", "prompt": "one two three", "stream": stream}
    body["model_parameters"] = {"max_tokens": max_tokens}
    if account is not None:
        body["account_id"] = account
    return body


async def usage(server: InProcessServer, key: str, **params: str) -> dict:
    async with server.client(api_key=key) as http:
        response = await http.get("/v4/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_every_request_naming_a_model_is_one_record(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, api_keys=KEYS) as server:
        sent: list[str] = []
        async with server.client() as http:
            for n in range(4):
                response = await http.post("/v4/completions", json=v4(3, stream=n % 2 == 1))
                assert response.status_code == 200
                sent.append(response.headers["x-request-id"])
            chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            response = await http.post("/v1/chat/completions", json=chat)
            assert response.status_code == 200
            sent.append(response.headers["x-request-id"])
            # A request the model refuses (context too long) is a record too, with no tokens:
            # none reached the engine.
            refused = await http.post("/v4/completions", json=v4(100_000))
            assert refused.status_code == 400
            sent.append(refused.headers["x-request-id"])
            # Requests that never name a registered model are not: nothing was used.
            assert (await http.post("/v4/completions", json={**v4(1), "model": "nope"})).status_code == 404
        report = await usage(server, ADMIN_KEY)
    rows = report["rows"]
    assert sorted(row["request_id"] for row in rows) == sorted(sent)
    assert report["totals"]["requests"] == len(sent)
    chat_row = next(row for row in rows if row["route"] == "/v1/chat/completions")
    assert report["totals"]["completion_tokens"] == 4 * 3 + 2
    assert report["totals"]["prompt_tokens"] == 4 * 4 + chat_row["prompt_tokens"] + 0
    by_status = sorted(row["status"] for row in rows)
    assert by_status == [200] * 5 + [400]
    for row in rows:
        assert row["account_id"] == ACCOUNT and row["model"] == "tiny-llama"
        assert row["key_name"] == "V4SERVE_API_KEYS item 1"
        assert API_KEY not in str(row.values())
        assert row["duration_seconds"] >= 0


async def test_keys_see_their_own_usage_and_admins_see_all(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, api_keys=KEYS) as server:
        async with server.client(api_key=API_KEY) as http:  # bound to ACCOUNT
            assert (await http.post("/v4/completions", json=v4(1))).status_code == 200
        async with server.client(api_key=OTHER_KEY) as http:  # no account: names one per request
            assert (await http.post("/v4/completions", json=v4(2, account="team-b"))).status_code == 200
            assert (await http.post("/v4/completions", json=v4(3, account="team-c"))).status_code == 200
        admin = await usage(server, ADMIN_KEY)
        assert admin["totals"]["requests"] == 3
        assert (await usage(server, ADMIN_KEY, account_id="team-b"))["totals"]["completion_tokens"] == 2
        own = await usage(server, API_KEY)
        assert [row["account_id"] for row in own["rows"]] == [ACCOUNT]
        assert (await usage(server, API_KEY, account_id=ACCOUNT))["totals"]["requests"] == 1
        # A key without an account sees the records made with it, whatever account they named.
        other = await usage(server, OTHER_KEY)
        assert sorted(row["account_id"] for row in other["rows"]) == ["team-b", "team-c"]
        assert (await usage(server, OTHER_KEY, account_id="team-c"))["totals"]["completion_tokens"] == 3
        async with server.client(api_key=API_KEY) as http:
            forbidden = await http.get("/v4/usage", params={"account_id": "team-b"})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["type"] == "permission_denied"
        assert forbidden.json()["error"]["param"] == "account_id"
        async with server.client(api_key=None) as http:
            assert (await http.get("/v4/usage")).status_code == 401


async def test_usage_filters_by_model_and_time(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, api_keys=KEYS) as server:
        async with server.client() as http:
            assert (await http.post("/v4/completions", json=v4(1))).status_code == 200
        (row,) = (await usage(server, ADMIN_KEY))["rows"]
        moment = datetime.datetime.fromisoformat(row["time"])
        after = (moment + datetime.timedelta(seconds=1)).isoformat()
        assert (await usage(server, ADMIN_KEY, since=row["time"]))["totals"]["requests"] == 1
        assert (await usage(server, ADMIN_KEY, since=after))["totals"]["requests"] == 0
        assert (await usage(server, ADMIN_KEY, until=str(moment.timestamp())))["totals"]["requests"] == 0
        assert (await usage(server, ADMIN_KEY, until=after))["totals"]["requests"] == 1
        assert (await usage(server, ADMIN_KEY, model="tiny-chat"))["totals"]["requests"] == 0
        async with server.client(api_key=ADMIN_KEY) as http:
            bad = await http.get("/v4/usage", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "query.since"


async def test_the_cli_prints_what_the_route_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(tmp_path, api_keys=KEYS) as server:
        async with server.client() as http:
            for tokens in (2, 5):
                assert (await http.post("/v4/completions", json=v4(tokens))).status_code == 200
        expected = await usage(server, ADMIN_KEY, account_id=ACCOUNT)
    for name in [name for name in os.environ if name.startswith("V4SERVE_")]:
        monkeypatch.delenv(name)
    assert cli_main(["usage", "--home", str(tmp_path), "--account-id", ACCOUNT, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert cli_main(["usage", "--home", str(tmp_path), "--model", "tiny-llama"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "requests=2 prompt_tokens=8 completion_tokens=7 total_tokens=15"
    assert len(text) == 1 + 1 + 2  # totals, header, two rows
    assert cli_main(["usage", "--home", str(tmp_path / "elsewhere")]) == 1
    assert "no usage ledger" in capsys.readouterr().err


def record(n: int) -> UsageRecord:
    return UsageRecord(
        time=1_700_000_000.0 + n,
        request_id=f"r{n}",
        account="a" if n % 2 else "b",
        key_name="k",
        model="m",
        route="/v4/completions",
        prompt_tokens=n,
        completion_tokens=1,
        status=200,
        duration=0.1,
    )


def test_concurrent_writers_all_commit_and_queries_total_them(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "usage.sqlite3")
    futures = []
    lock = threading.Lock()

    def write(start: int) -> None:
        for n in range(start, start + 100):
            future = ledger.write(record(n))
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=write, args=(start,)) for start in range(0, 800, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for future in futures:
        future.result(timeout=60)
    report = ledger.query(UsageFilter(limit=5))
    assert report.totals.requests == 800 and report.totals.prompt_tokens == sum(range(800))
    assert [row.request_id for row in report.rows] == ["r799", "r798", "r797", "r796", "r795"]
    odd = ledger.query(UsageFilter(account="a", since=1_700_000_100.0, until=1_700_000_200.0))
    assert odd.totals.requests == 50
    ledger.close()
    assert isinstance(ledger.write(record(1)).exception(timeout=1), RuntimeError)


WRITER = """
import sys
from server.telemetry import Ledger, UsageRecord
ledger = Ledger(sys.argv[1])
n = 0
while True:
    ledger.write(UsageRecord(float(n), f"r{n}", None, None, "m", "/v4/completions", 1, 1, 200, 0.0)).result()
    print(f"r{n}", flush=True)
    n += 1
"""


def test_a_committed_record_survives_kill_9(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream: every record whose commit it had seen
    (printed) is in the ledger."""
    path = tmp_path / "usage.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    assert writer.stdout is not None
    committed = [writer.stdout.readline().strip() for _ in range(200)]
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    found = {row.request_id for row in Ledger(path, writable=False).query(UsageFilter(limit=100_000)).rows}
    assert set(committed) <= found


class GatedLedger:
    """A ledger whose commits wait until the test lets them through."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.commits: list[concurrent.futures.Future[None]] = []
        self.written = asyncio.Event()

    def write(self, record: UsageRecord) -> concurrent.futures.Future[None]:
        self.records.append(record)
        self.commits.append(concurrent.futures.Future())
        self.written.set()
        return self.commits[-1]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True])
async def test_the_last_byte_waits_for_the_commit(tmp_path: Path, stream: bool) -> None:
    """What makes a record survive ``kill -9``: the response's last byte goes out only
    once its record is committed. Here the commit is held: the body stops short of its
    end until the commit is let through."""
    async with serve_in_process(tmp_path, api_keys=KEYS) as server:
        gated = GatedLedger()
        state_of(server.app).telemetry.ledger = gated  # type: ignore[assignment]
        sent: list[dict] = []
        body = json.dumps(v4(3, stream=stream)).encode()
        delivered = asyncio.Event()

        async def receive() -> dict:
            if not delivered.is_set():
                delivered.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"x-api-key", API_KEY.encode()), (b"content-type", b"application/json")]
        scope = asgi_post_scope("/v4/completions", headers)
        request = asyncio.ensure_future(server.app(scope, receive, send))
        await asyncio.wait_for(gated.written.wait(), 30)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
        (record,) = gated.records
        assert record.completion_tokens == 3 and record.status == 200
        gated.commits[0].set_result(None)
        await asyncio.wait_for(request, 30)
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"finish_reason":"length"' in answer


async def test_a_request_outside_http_is_recorded_through_track(tmp_path: Path) -> None:
    """What the batch runner uses: a request that did not come over HTTP, metered alike."""
    from server.telemetry import Telemetry, current, serving

    telemetry = Telemetry(ledger=Ledger(tmp_path / "usage.sqlite3"))
    async with telemetry.track("/v1/batches", key_name="batch-key", account="team-z") as request:
        assert current() is request
        serving("tiny-llama", "team-z")
        request.generation_started(7, stream=False)
        request.delta(0, 5)
        request.status = 200
    async with telemetry.track("/v1/batches") as abandoned:
        serving("tiny-llama", None)
    assert current() is None
    rows = telemetry.ledger.query(UsageFilter()).rows if telemetry.ledger else []
    telemetry.close()
    by_id = {row.request_id: row for row in rows}
    done, left = by_id[request.request_id], by_id[abandoned.request_id]
    assert (done.route, done.key_name, done.account, done.prompt_tokens, done.completion_tokens, done.status) == (
        "/v1/batches",
        "batch-key",
        "team-z",
        7,
        5,
        200,
    )
    assert left.status == 499


def test_admin_keys_are_marked_in_the_keys_source() -> None:
    """``key:account:admin`` (or ``key::admin``) makes an admin key, which sees every
    account's usage; anything else in the third field is refused at start-up."""
    from server.api.auth import KeyRing, KeyRingError

    ring = KeyRing.from_sources("ops:team-a:admin,root::admin,plain:team-b,bare", None)
    assert [(key.account, key.admin) for key in map(ring.match, (b"ops", b"root", b"plain", b"bare"))] == [
        ("team-a", True),
        (None, True),
        ("team-b", False),
        (None, False),
    ]
    with pytest.raises(KeyRingError, match="item 1: unknown key role 'owner'"):
        KeyRing.from_sources("k:acct:owner", None)
    with pytest.raises(KeyRingError, match="another account or role"):
        KeyRing.from_sources("k:acct:admin,k:acct", None)
