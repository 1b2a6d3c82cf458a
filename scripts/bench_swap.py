"""Time to first token when a request needs a model swap.

Starts v4serve with two models and a memory budget that holds only one, then sends
requests alternating between them: every request after the first unloads the other
model (or, with --sleep-mode on a GPU, puts it to sleep) and loads its own. Prints the
TTFT of each swap and of warm requests for comparison.

    .venv/bin/python scripts/bench_swap.py                      # CPU, the builtin tiny-llama twice
    .venv/bin/python scripts/bench_swap.py --registry gpu.yaml --model-a llama-3-8b-instruct \\
        --model-b mistral-7b-instruct --budget 40GiB --sleep-mode   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.testing import free_port

REPO = Path(__file__).resolve().parents[1]

TINY_ENTRY = """\
  {name}:
    source: builtin:tiny-llama
    dtype: float32
    max_model_len: 2048
    kv_cache_memory: 256MiB
    memory: 2GiB
    engine_args: {{enforce_eager: true}}
"""
TINY_PAIR = "models:\n" + TINY_ENTRY.format(name="swap-a") + TINY_ENTRY.format(name="swap-b")


def ttft(base_url: str, model: str) -> float:
    body = {
        "model": model,
        "prompt": "Hello there",
        "stream": True,
        "model_parameters": {"temperature": 0, "max_tokens": 16},
    }
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{base_url}/v4/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - start
    assert first is not None, "the stream sent no event"
    return first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, help="operator registry with the two models (default: two tiny ones)")
    parser.add_argument("--model-a", default="swap-a")
    parser.add_argument("--model-b", default="swap-b")
    parser.add_argument("--budget", default="3GiB", help="memory budget per device: room for one model only")
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--sleep-mode", action="store_true", help="GPU only: sleep instead of unloading")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        registry = args.registry
        if registry is None:
            registry = Path(scratch) / "swap.yaml"
            registry.write_text(TINY_PAIR)
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(port),
            "--registry",
            str(registry),
            "--memory-budget",
            args.budget,
            "--preload",
            args.model_a,
            "--log-level",
            "warning",
        ]
        if args.sleep_mode:
            command.append("--sleep-mode")
        env = {k: v for k, v in os.environ.items() if not k.startswith("V4SERVE_")}
        with open(Path(scratch) / "server.log", "wb") as log:  # the child keeps its own copy
            server = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while True:
                try:
                    if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start; log: {log.name}")
                time.sleep(0.5)
            warm = [ttft(base_url, args.model_a) for _ in range(5)]
            swaps = []
            for i in range(args.swaps):
                model = args.model_b if i % 2 == 0 else args.model_a
                swaps.append(ttft(base_url, model))
                print(f"swap {i + 1} to {model}: TTFT {swaps[-1]:.2f} s", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(120)

    result = {
        "warm_ttft_ms_p50": statistics.median(warm) * 1000,
        "swap_ttft_s": swaps,
        "swap_ttft_s_p50": statistics.median(swaps),
        "sleep_mode": args.sleep_mode,
        "models": [args.model_a, args.model_b],
    }
    print(
        f"warm TTFT p50 {result['warm_ttft_ms_p50']:.1f} ms; swap TTFT p50 {result['swap_ttft_s_p50']:.2f} s "
        f"over {len(swaps)} swaps ({'sleep mode' if args.sleep_mode else 'unload and reload'})"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
