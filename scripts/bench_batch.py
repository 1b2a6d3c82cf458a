"""Offline batch throughput: ``v4serve batch`` against vLLM's ``LLM.chat`` and ``vllm run-batch``.

The same chat prompts (``/v1/chat/completions`` lines, the only kind vLLM 0.32's
``run_batch`` takes), greedy, each exactly ``--max-tokens`` long (``ignore_eos``), run three
ways, each in a fresh process with the same model and engine settings
(``bench_common.EngineSettings``):

``v4serve``  ``python -m server batch IN OUT`` (this project; lines go to the engine pool
             directly, up to the model's ``max_running`` at once)
``offline``  vLLM's offline ``LLM(...).chat(conversations, SamplingParams)`` on all prompts
``run-batch`` ``python -m vllm.entrypoints.openai.run_batch -i IN -o OUT`` (vLLM's own)

A run's wall time is from its process's launch to its last result on disk (the output
file's last write), engine start included, engine shutdown not; its throughput is the
output tokens it reports over that time. Rounds alternate the order of the three, so a
machine's drift hits each alike; the summary gives each one's median and range, and the
median of the per-round ratios of v4serve to the others.

    .venv/bin/python scripts/bench_batch.py --lines 512 --max-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    MODEL_NAME,
    REPO,
    EngineSettings,
    builtin_model,
    machine,
    prompts,
    scratch_dir,
    spread,
    v4serve_registry,
)

SYSTEMS = ("v4serve", "offline", "run-batch")


def write_input(path: Path, lines: int, max_tokens: int) -> None:
    with path.open("w") as file:
        for index, prompt in enumerate(prompts(lines)):
            body = {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            line = {"custom_id": f"line-{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            file.write(json.dumps(line) + "\n")


def command(system: str, settings: EngineSettings, input_path: Path, output_path: Path, work: Path) -> list[str]:
    if system == "v4serve":
        registry = work / "registry.yaml"
        registry.write_text(v4serve_registry(settings))
        home = work / "home"
        return [
            sys.executable,
            "-m",
            "server",
            "batch",
            str(input_path),
            str(output_path),
            "--registry",
            str(registry),
            "--home",
            str(home),
        ]
    if system == "offline":
        return [sys.executable, __file__, "--offline-child", str(input_path), str(output_path), *engine_flags(settings)]
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(input_path),
        "-o",
        str(output_path),
        "--served-model-name",
        MODEL_NAME,
        *engine_flags(settings),
    ]


def engine_flags(settings: EngineSettings) -> list[str]:
    return [
        "--model",
        str(settings.model),
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--kv-cache-memory-bytes",
        str(settings.kv_cache_bytes),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--enforce-eager",
    ]


def output_tokens(system: str, output_path: Path) -> tuple[int, int]:
    """(output tokens, lines answered with 200) of a finished run."""
    if system == "offline":
        result = json.loads(output_path.read_text())
        return int(result["completion_tokens"]), int(result["lines"])
    tokens = ok = 0
    for raw in output_path.read_text().splitlines():
        response = json.loads(raw).get("response") or {}
        if response.get("status_code") == 200:
            ok += 1
            tokens += int(response["body"]["usage"]["completion_tokens"])
    return tokens, ok


def run_once(system: str, settings: EngineSettings, input_path: Path, work: Path) -> dict[str, Any]:
    output_path = work / f"out-{system}.jsonl"
    output_path.unlink(missing_ok=True)
    log = work / f"{system}.log"
    started = time.time()
    with log.open("wb") as sink:
        code = subprocess.run(
            command(system, settings, input_path, output_path, work), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
        ).returncode
    if code != 0 or not output_path.exists():
        raise RuntimeError(f"{system} failed ({code}); see {log}")
    wall = output_path.stat().st_mtime - started
    tokens, ok = output_tokens(system, output_path)
    return {"system": system, "wall_s": wall, "output_tokens": tokens, "ok_lines": ok, "tokens_per_s": tokens / wall}


def offline_child(argv: list[str]) -> int:
    """``LLM.chat`` over every line's conversation; writes the token count when done."""
    parser = argparse.ArgumentParser()
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--dtype")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--kv-cache-memory-bytes", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)
    from vllm import LLM, SamplingParams

    bodies = [json.loads(raw)["body"] for raw in args.input.read_text().splitlines()]
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
    )
    first = bodies[0]
    sampling = SamplingParams(temperature=first["temperature"], max_tokens=first["max_tokens"], ignore_eos=True)
    outputs = llm.chat([body["messages"] for body in bodies], sampling, use_tqdm=False)
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    args.output.write_text(json.dumps({"completion_tokens": tokens, "lines": len(outputs)}))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--offline-child":
        return offline_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of " + ", ".join(SYSTEMS))
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()
    systems = [name for name in args.systems.split(",") if name]
    settings = EngineSettings(model=builtin_model())
    work = scratch_dir()
    input_path = work / "in.jsonl"
    write_input(input_path, args.lines, args.max_tokens)
    print(f"{args.lines} chat lines x {args.max_tokens} tokens, {args.rounds} rounds; scratch {work}", flush=True)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        shift = round_index % len(systems)
        for system in systems[shift:] + systems[:shift]:
            result = run_once(system, settings, input_path, work)
            result["round"] = round_index
            runs.append(result)
            print(
                f"round {round_index} {system:9s} wall {result['wall_s']:6.1f} s  "
                f"{result['output_tokens']:7d} tokens  {result['tokens_per_s']:8.0f} tokens/s  "
                f"({result['ok_lines']} lines)",
                flush=True,
            )
    summary = summarize(runs, systems)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runs": runs, "summary": summary}, indent=2))
    return 0


def summarize(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for system in systems:
        mine = [run for run in runs if run["system"] == system]
        rate = spread([run["tokens_per_s"] for run in mine])
        wall = spread([run["wall_s"] for run in mine])
        summary[system] = {
            "tokens_per_s": {"median": rate[0], "min": rate[1], "max": rate[2]},
            "wall_s": {"median": wall[0], "min": wall[1], "max": wall[2]},
        }
    if "v4serve" in systems:
        for other in systems:
            if other == "v4serve":
                continue
            ratios = []
            for round_index in sorted({run["round"] for run in runs}):
                pair = {run["system"]: run["tokens_per_s"] for run in runs if run["round"] == round_index}
                if "v4serve" in pair and other in pair:
                    ratios.append(pair["v4serve"] / pair[other])
            if ratios:
                summary[f"v4serve/{other}"] = {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                }
    summary["cpu_count"] = os.cpu_count()
    return summary


if __name__ == "__main__":
    sys.exit(main())
