"""Throughput of ``v4serve serve --ray`` on one node against plain ``v4serve serve``.

Starts a Ray node on loopback (as tests/ray_cluster.py does) and both servers with the
same model and engine: the plain server runs the engine in its own pool; the Ray path
runs it in one replica actor behind the ingress, so every request crosses one more hop
(ingress -> replica over Ray) and every delta comes back as a Ray object. Rounds
alternate between the two servers (each idle while the other runs); each round sends
``--requests`` completions, ``--concurrency`` at a time, and counts output tokens per
second of wall time. Prints each round and the medians, and the median of the paired
ratios (Ray / plain), as JSON on the last line.

    .venv/bin/python scripts/bench_ray_serve.py                      # vLLM, tiny-llama, CPU
    .venv/bin/python scripts/bench_ray_serve.py --stream --rounds 7 --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.testing import ServerProcess, server_env  # noqa: E402
from tests.ray_cluster import RAY_ENV, start_ray_node  # noqa: E402

MODEL = "bench-tiny"
REGISTRY = """\
models:
  {model}:
    source: builtin:tiny-llama
    engine: {engine}
    dtype: float32
    max_model_len: 2048
    kv_cache_memory: 256MiB
    engine_args: {engine_args}
"""
ENGINE_ARGS = {"vllm": "{enforce_eager: true}", "transformers": "{max_batch_size: 32}"}


async def one_round(base_url: str, requests: int, concurrency: int, max_tokens: int, stream: bool) -> dict[str, float]:
    """Output tokens per second over one round's wall time, and how many requests failed."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "stream": stream,
        "model_parameters": {"temperature": 0, "max_tokens": max_tokens, "stop_sequences": ["never-xyz"]},
    }
    gate = asyncio.Semaphore(concurrency)
    tokens = failed = 0

    async def send(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failed
        async with gate:
            if not stream:
                response = await client.post("/v4/completions", json=body)
                if response.status_code != 200:
                    failed += 1
                    return
                tokens += response.json()["token_usage"]["completion"]
                return
            async with client.stream("POST", "/v4/completions", json=body) as response:
                last = None
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        last = json.loads(line.removeprefix("data: "))
                if response.status_code != 200 or not last or not last.get("token_usage"):
                    failed += 1
                    return
                tokens += last["token_usage"]["completion"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(send(client) for _ in range(requests)))
        wall = time.perf_counter() - started
    return {"tokens_per_second": tokens / wall, "wall_seconds": wall, "failed": failed}


def warm(server: ServerProcess) -> None:
    """Load the model (and, on the Ray path, bind it to its replica) before timing."""
    deadline = time.monotonic() + 900
    while True:
        response = httpx.post(
            server.base_url + "/v4/completions",
            json={"model": MODEL, "prompt": "warm up", "model_parameters": {"max_tokens": 4}},
            timeout=900,
        )
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.base_url}: {response.status_code} {response.text}")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINE_ARGS), default="vllm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="stream every answer (one Ray object per delta)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    registry = scratch / "registry.yaml"
    registry.write_text(REGISTRY.format(model=MODEL, engine=args.engine, engine_args=ENGINE_ARGS[args.engine]))
    home = ["--home", str(REPO / ".cache" / "test-home"), "--registry", str(registry)]
    env = {**server_env(), **RAY_ENV}
    node = start_ray_node(resources=("host_a",))
    servers: dict[str, ServerProcess] = {}
    try:
        servers["plain"] = ServerProcess.start(home, log_dir=scratch, env=env, ready_path="/healthz")
        ray_args = [*home, "--ray", node.address, "--ray-replica-resource", "host_a"]
        servers["ray"] = ServerProcess.start(ray_args, log_dir=scratch, env=env, ready_path="/healthz")
        for server in servers.values():
            warm(server)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for index in range(args.rounds):
            # Alternate which goes first, so neither always runs on a machine the other just warmed.
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for name in order:
                result = asyncio.run(
                    one_round(servers[name].base_url, args.requests, args.concurrency, args.max_tokens, args.stream)
                )
                rounds[name].append(result)
                print(f"round {index} {name}: {result['tokens_per_second']:.1f} tok/s, {result['failed']} failed")
        ratios = [
            r["tokens_per_second"] / p["tokens_per_second"] for r, p in zip(rounds["ray"], rounds["plain"], strict=True)
        ]
        summary = {
            "engine": args.engine,
            "stream": args.stream,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "machine": f"{platform.machine()}, {platform.node()}",
            "median_tokens_per_second": {
                name: statistics.median(r["tokens_per_second"] for r in results) for name, results in rounds.items()
            },
            "median_ratio_ray_over_plain": statistics.median(ratios),
            "failed": {name: sum(r["failed"] for r in results) for name, results in rounds.items()},
        }
        print(json.dumps(summary))
    finally:
        for server in servers.values():
            server.stop()
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
