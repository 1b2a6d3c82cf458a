"""v4serve against vLLM's own OpenAI server: same model, same engine settings, same load.

Starts each server in turn on the tiny builtin model (or --model DIR), drives it with
concurrent streaming requests of a fixed number of output tokens, and prints output
tokens/s and time to first token (p50/p99) for each, and their ratios.

    .venv/bin/python scripts/bench_vs_vllm.py                  # 64 concurrent x 128 tokens
    .venv/bin/python scripts/bench_vs_vllm.py --rounds 3 --requests 512 --out bench.json

Both servers are asked for greedy output (temperature 0) of the same prompts, so they
generate the same tokens and the comparison measures the serving layers, not sampling.
TTFT is the time from sending the request to the first streamed event, for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    server: str
    requests: int
    output_tokens: int
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prompts(count: int) -> list[str]:
    words = "serving models on your own hardware with streaming tokens and stop sequences".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(24)) + f" {i}" for i in range(count)]


class Server:
    """A server process started for the benchmark and stopped with its whole group."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, env: dict[str, str]):
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
        )

    async def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; log: {self.log.name}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}{self.ready_path}") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout} s; log: {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_v4serve(model_dir: Path, args: argparse.Namespace, registry: Path) -> Server:
    registry.write_text(
        "models:\n"
        "  bench:\n"
        f"    source: {model_dir}\n"
        "    dtype: float32\n"
        f"    max_model_len: {args.max_model_len}\n"
        f"    kv_cache_memory: {args.kv_cache_bytes}\n"
        "    engine_args:\n"
        "      enforce_eager: true\n"
        f"      max_num_seqs: {args.max_num_seqs}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("V4SERVE_")}
    command = [sys.executable, "-m", "server", "serve", "--port", str(port), "--registry", str(registry),
               "--preload", "bench", "--log-level", "warning"]
    return Server("v4serve", command, port, "/readyz", env)


def start_vllm(model_dir: Path, args: argparse.Namespace) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", str(args.max_model_len),
               "--kv-cache-memory-bytes", str(args.kv_cache_bytes), "--enforce-eager",
               "--max-num-seqs", str(args.max_num_seqs), "--disable-log-stats", "--disable-uvicorn-access-log",
               "--host", "127.0.0.1", "--port", str(port)]
    return Server("vllm", command, port, "/v1/models", dict(os.environ))


async def one_request(session: aiohttp.ClientSession, server: Server, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, output tokens) of one streaming request."""
    if server.name == "v4serve":
        url = f"http://127.0.0.1:{server.port}/v4/completions"
        body = {"model": "bench", "prompt": prompt, "stream": True,
                "model_parameters": {"temperature": 0, "max_tokens": max_tokens}}
    else:
        url = f"http://127.0.0.1:{server.port}/v1/completions"
        body = {"model": "bench", "prompt": prompt, "stream": True, "temperature": 0, "max_tokens": max_tokens,
                "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    last = b""
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            if line.strip() != b"data: [DONE]":
                last = line
    final = json.loads(last[len(b"data: "):])
    tokens = final["token_usage"]["completion"] if server.name == "v4serve" else final["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


async def drive(server: Server, args: argparse.Namespace) -> RunResult:
    texts = prompts(args.requests)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one_request(session, server, t, args.max_tokens) for t in texts[: args.concurrency]))
        queue = iter(texts)
        results: list[tuple[float, int]] = []

        async def worker() -> None:
            for prompt in queue:
                results.append(await one_request(session, server, prompt, args.max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
    ttfts = [r[0] * 1000 for r in results]
    return RunResult(server.name, len(results), sum(r[1] for r in results), seconds,
                     statistics.median(ttfts), percentile(ttfts, 99))


async def measure(name: str, model_dir: Path, args: argparse.Namespace, scratch: Path) -> RunResult:
    server = start_v4serve(model_dir, args, scratch / "bench.yaml") if name == "v4serve" else start_vllm(model_dir, args)
    try:
        await server.wait_ready()
        return await drive(server, args)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="local model directory (default: the builtin tiny-llama)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server; medians are reported")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()

    if args.model is None:
        from server.weights.tiny import ensure_builtin

        args.model = ensure_builtin("tiny-llama", Path("~/.cache/v4serve").expanduser())
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            order = ["v4serve", "vllm"] if round_index % 2 == 0 else ["vllm", "v4serve"]
            for name in order:
                result = asyncio.run(measure(name, args.model, args, Path(scratch)))
                runs.append(result)
                print(f"round {round_index + 1} {name:8s} {result.tokens_per_s:9.1f} tok/s  "
                      f"TTFT p50 {result.ttft_p50_ms:7.1f} ms  p99 {result.ttft_p99_ms:7.1f} ms  "
                      f"({result.output_tokens} tokens, {result.requests} requests, {result.seconds:.1f} s)", flush=True)

    def median_of(name: str, field: str) -> float:
        values = [getattr(r, field) if field != "tokens_per_s" else r.tokens_per_s for r in runs if r.server == name]
        return statistics.median(values)

    summary = {
        name: {field: median_of(name, field) for field in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
        for name in ("v4serve", "vllm")
    }
    throughput_ratio = summary["v4serve"]["tokens_per_s"] / summary["vllm"]["tokens_per_s"]
    ttft_ratio = summary["v4serve"]["ttft_p50_ms"] / summary["vllm"]["ttft_p50_ms"]
    print(f"\nconcurrency {args.concurrency}, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds (medians)")
    for name, values in summary.items():
        print(f"{name:8s} {values['tokens_per_s']:9.1f} tok/s  TTFT p50 {values['ttft_p50_ms']:7.1f} ms  "
              f"p99 {values['ttft_p99_ms']:7.1f} ms")
    print(f"throughput ratio v4serve/vllm: {throughput_ratio:.3f} (target >= 1.0)")
    print(f"TTFT p50 ratio v4serve/vllm:   {ttft_ratio:.3f} (target <= 1.05)")
    if args.out:
        args.out.write_text(json.dumps({"runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in runs],
                                        "summary": summary, "throughput_ratio": throughput_ratio,
                                        "ttft_p50_ratio": ttft_ratio, "settings": vars(args) | {"model": str(args.model)}},
                                       indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
