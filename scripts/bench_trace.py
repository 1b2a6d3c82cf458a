"""Per-request timestamps at each serving layer, for v4serve or vLLM's own server.

Runs a server in this process with timing hooks installed, and writes one JSON line per
HTTP request to ``--trace-out``: when its first byte was parsed, when the app started,
when auth, validation, the lease and tokenization were done (v4serve), when the engine
took the request, each engine output, each body ``send`` and the end of the stream. The
clock is ``time.perf_counter`` (CLOCK_MONOTONIC, the same in every process on Linux), so
a client's own timestamps can be lined up with the server's; a client may send an
``x-bench-id`` header to name its request in the trace.

    .venv/bin/python scripts/bench_trace.py --trace-out t.jsonl v4serve serve --port 8000 ...
    .venv/bin/python scripts/bench_trace.py --trace-out t.jsonl vllm --model DIR --port 8001 ...
    .venv/bin/python scripts/bench_trace.py --summarize t.jsonl

The hooks wrap functions (no server code is changed) and cost a few microseconds per
token; ``--summarize`` prints the median and p90 of each stage, which is how the README's
"life of one request" table was made. An event-loop lag monitor (a 1 ms sleeper) records
how late the server's loop ran each callback, in ``loop_lag`` lines, with ``--loop-lag``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextvars
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

now = time.perf_counter
_record: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("bench_trace", default=None)
_out: Any = None
_lag: list[float] = []
_lag_monitor_on = False


def mark(name: str) -> None:
    """Stamp ``name`` on the current request's record (first time only)."""
    record = _record.get()
    if record is not None and name not in record:
        record[name] = now()


def _write(record: dict[str, Any]) -> None:
    if _out is not None:
        _out.write(json.dumps(record) + "\n")


def _install_uvicorn() -> None:
    from uvicorn.protocols.http import httptools_impl as impl

    protocol, cycle_class = impl.HttpToolsProtocol, impl.RequestResponseCycle
    begin, headers_complete = protocol.on_message_begin, protocol.on_headers_complete
    run_asgi, send, receive = cycle_class.run_asgi, cycle_class.send, cycle_class.receive

    def on_message_begin(self: Any) -> None:
        self._bench_begin = now()
        begin(self)

    def on_headers_complete(self: Any) -> None:
        headers_complete(self)
        cycle = self.cycle
        headers = dict(self.headers) if hasattr(self, "headers") else {}
        cycle._bench = {
            "recv": getattr(self, "_bench_begin", now()),
            "parsed": now(),
            "path": self.scope.get("path"),
            "client_port": (self.client or (None, None))[1],
            "id": (headers.get(b"x-bench-id") or b"").decode() or None,
        }

    async def traced_run_asgi(self: Any, app: Any) -> None:
        record = getattr(self, "_bench", None) or {"recv": now()}
        _record.set(record)
        record["app"] = now()
        _ensure_lag_monitor()
        try:
            await run_asgi(self, app)
        finally:
            record["done"] = now()
            _write(record)

    async def traced_send(self: Any, message: Any) -> None:
        record = getattr(self, "_bench", None)
        if record is not None:
            kind = message["type"]
            if kind == "http.response.start":
                record["headers"] = now()
                record["status"] = message.get("status")
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if body:
                    record.setdefault("sends", []).append(now())
                    record.setdefault("send_bytes", []).append(len(body))
                if not message.get("more_body", False):
                    record["end"] = now()
        await send(self, message)

    async def traced_receive(self: Any) -> Any:
        message = await receive(self)
        record = getattr(self, "_bench", None)
        if record is not None and message["type"] == "http.request" and not message.get("more_body"):
            record.setdefault("body", now())
        return message

    protocol.on_message_begin = on_message_begin
    cycle_class.receive = traced_receive
    protocol.on_headers_complete = on_headers_complete
    cycle_class.run_asgi = traced_run_asgi
    cycle_class.send = traced_send


def _install_vllm() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    add_request, generate = AsyncLLM.add_request, AsyncLLM.generate

    @functools.wraps(add_request)
    async def traced_add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark("engine_add")
        try:
            return await add_request(self, *args, **kwargs)
        finally:
            mark("engine_added")

    @functools.wraps(generate)
    async def traced_generate(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        record = _record.get()
        outputs: list[float] = [] if record is None else record.setdefault("outputs", [])
        tokens: list[int] = [] if record is None else record.setdefault("output_tokens", [])
        async for output in generate(self, *args, **kwargs):
            outputs.append(now())
            tokens.append(sum(len(o.token_ids) for o in output.outputs))
            yield output

    AsyncLLM.add_request = traced_add_request
    AsyncLLM.generate = traced_generate


def _wrap_async(owner: Any, name: str, before: str | None, after: str | None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        try:
            return await original(*args, **kwargs)
        finally:
            if after:
                mark(after)

    setattr(owner, name, wrapper)


def _install_v4serve() -> None:
    from server.api.auth import ApiKeyAuth
    from server.api.limits import BodySizeLimit
    from server.engines.vllm_engine import VLLMEngine
    from server.pool.pool import EnginePool, Lease
    from server.service.completions import CompletionService

    _wrap_async(ApiKeyAuth, "__call__", "auth", None)
    _wrap_async(BodySizeLimit, "__call__", "authorized", None)
    _wrap_async(CompletionService, "prepare", "validated", "prepared")
    _wrap_async(EnginePool, "lease", None, "leased")
    _wrap_async(VLLMEngine, "prepare", "tokenize", "tokenized")
    release = Lease.release

    def traced_release(self: Any) -> None:
        mark("released")
        release(self)

    Lease.release = traced_release


_lag_task: asyncio.Task[None] | None = None


def _ensure_lag_monitor() -> None:
    global _lag_task
    if _lag_monitor_on and _lag_task is None:
        _lag_task = asyncio.get_running_loop().create_task(_lag_monitor())


async def _lag_monitor() -> None:
    """How late a 1 ms sleep wakes: the loop's own queueing delay, written every 2 s."""
    last_flush = now()
    while True:
        before = now()
        await asyncio.sleep(0.001)
        _lag.append(now() - before - 0.001)
        if now() - last_flush > 2 and _out is not None:
            lags = sorted(_lag)
            _out.write(
                json.dumps(
                    {
                        "loop_lag": {
                            "n": len(lags),
                            "p50": lags[len(lags) // 2],
                            "p99": lags[int(len(lags) * 0.99)],
                            "max": lags[-1],
                            "t": now(),
                        }
                    }
                )
                + "\n"
            )
            _out.flush()
            _lag.clear()
            last_flush = now()


def _install_vllm_server() -> None:
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    _wrap_async(OpenAIServingCompletion, "create_completion", "validated", "prepared")
    _wrap_async(OpenAIServingCompletion, "render_completion_request", "tokenize", "tokenized")


def run_server(kind: str, argv: list[str], trace_out: Path) -> int:
    global _out
    _out = open(trace_out, "a", buffering=1 << 16)  # noqa: SIM115 - open for the process's life
    _install_uvicorn()
    _install_vllm()
    try:
        if kind == "v4serve":
            _install_v4serve()
            from server.cli import main

            return main(argv)
        import runpy

        _install_vllm_server()

        sys.argv = ["vllm.entrypoints.openai.api_server", *argv]
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
        return 0
    finally:
        _out.flush()


# ----- summary ---------------------------------------------------------------------------

STAGES: list[tuple[str, str, str]] = [
    ("receive -> app task starts", "recv", "app"),
    ("app -> auth middleware", "app", "auth"),
    ("auth (key check)", "auth", "authorized"),
    ("auth -> request body fully received", "authorized", "body"),
    ("body -> route runs (JSON parse, validation, dependencies)", "body", "validated"),
    ("lookup + lease (admission)", "validated", "leased"),
    ("lease -> tokenize starts", "leased", "tokenize"),
    ("tokenize (vLLM renderer)", "tokenize", "tokenized"),
    ("tokenized -> prepare returns", "tokenized", "prepared"),
    ("prepared -> response headers sent", "prepared", "headers"),
    ("headers -> engine add_request", "headers", "engine_add"),
    ("engine add_request", "engine_add", "engine_added"),
    ("engine queue + prefill -> first output", "engine_added", "first_output"),
    ("first output -> first body send", "first_output", "first_send"),
    ("last output -> last body send", "last_output", "last_send"),
    ("last body send -> end of body sent", "last_send", "end"),
    ("end of body -> lease released", "end", "released"),
    ("end of body -> app returns", "end", "done"),
    ("TOTAL receive -> first body send", "recv", "first_send"),
    ("TOTAL receive -> end of body", "recv", "end"),
]


def summarize(path: Path) -> str:
    records = []
    lags = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if "loop_lag" in item:
            lags.append(item["loop_lag"])
        elif item.get("outputs") and item.get("sends"):
            item["first_output"], item["last_output"] = item["outputs"][0], item["outputs"][-1]
            item["first_send"], item["last_send"] = item["sends"][0], item["sends"][-1]
            records.append(item)
    if not records:
        return "no streamed requests in the trace"
    lines = [f"{len(records)} streamed requests", "", "| stage | p50 | p90 |", "|---|---:|---:|"]
    for label, start, end in STAGES:
        values = [(r[end] - r[start]) * 1e3 for r in records if start in r and end in r]
        if values:
            lines.append(f"| {label} | {_ms(statistics.median(values))} | {_ms(_pct(values, 90))} |")
    # Each send after the engine output it carries (the latest output before it).
    per_send = []
    for r in records:
        for sent in r["sends"]:
            index = bisect.bisect_right(r["outputs"], sent) - 1
            if index >= 0:
                per_send.append((sent - r["outputs"][index]) * 1e3)
    gaps = [(b - a) * 1e3 for r in records for a, b in zip(r["outputs"], r["outputs"][1:], strict=False)]
    events = [len(r["sends"]) for r in records]
    tokens = [sum(r.get("output_tokens", [])) for r in records]
    if per_send:
        lines.append(
            f"| engine output -> the body send that carries it | {_ms(statistics.median(per_send))} | {_ms(_pct(per_send, 90))} |"
        )
    if gaps:
        lines.append(
            f"| engine output -> next output (inter-token) | {_ms(statistics.median(gaps))} | {_ms(_pct(gaps, 90))} |"
        )
    lines.append("")
    lines.append(
        f"body sends per request: median {statistics.median(events)}, tokens per request: median "
        f"{statistics.median(tokens)}"
    )
    if lags:
        lines.append(
            f"event-loop lag (1 ms sleeper): p50 of p50s {_ms(statistics.median(x['p50'] for x in lags) * 1e3)}, "
            f"worst p99 {_ms(max(x['p99'] for x in lags) * 1e3)}, worst {_ms(max(x['max'] for x in lags) * 1e3)}"
        )
    return "\n".join(lines)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 1 else f"{value:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace-out", type=Path)
    parser.add_argument("--summarize", type=Path, help="print the stage table of a trace file and exit")
    parser.add_argument(
        "--loop-lag", action="store_true", help="also sample the event loop's lag (a 1 ms sleeper: 1000 wakeups/s)"
    )
    parser.add_argument("server", nargs="?", choices=["v4serve", "vllm"])
    args, rest = parser.parse_known_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.server is None or args.trace_out is None:
        parser.error("give --trace-out FILE and the server (v4serve ARGS... | vllm ARGS...)")
    global _lag_monitor_on
    _lag_monitor_on = args.loop_lag
    return run_server(args.server, rest, args.trace_out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
