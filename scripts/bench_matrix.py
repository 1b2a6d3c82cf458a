"""v4serve against vLLM's own OpenAI server: clients x modes x concurrency, many short rounds.

Both servers run the same local model with the same engine settings (bench_common's
``EngineSettings``: float32, enforce_eager, max_model_len 512, a 512 MiB KV cache,
max_num_seqs 128), and are asked for the same greedy tokens. A *cell* is one client
(aiohttp, httpx, the SDKs), one mode (streaming or not) and one concurrency; a *round*
is one closed-loop load on one server: ``concurrency`` workers, each sending its next
request as soon as the previous one ended, ``max(--min-requests, --waves x concurrency)``
requests of ``--max-tokens`` tokens.

Layouts. ``sequential``: only one server process exists at a time; each block starts one
server, runs every cell on it, stops it, then does the same with the other (the order
alternates between blocks: ABBA...). ``alternate`` (default): every server is started once
and every cell alternates A/B round by round; while one server is measured the others are
frozen (SIGSTOP on their process groups, SIGCONT before their own rounds), because an idle
server is not silent (each vLLM CPU worker keeps 13 gloo threads waking every 10 ms, which
on two cores preempt the client). So one server runs at a time either way, and alternate
rounds see the same machine within seconds of each other.

For each cell it prints the median, min and max over rounds of output tokens/s, TTFT p50
(to the first event with text), time per output token and the wait from the last event to
the end of the body, and the v4serve/vLLM ratio of each (geometric mean of the rounds
paired by block and repeat) with a 95% confidence interval. The table is Markdown, ready for the
README; ``--out`` keeps every round as JSON.

    .venv/bin/python scripts/bench_matrix.py --quick                 # ~5 minutes
    .venv/bin/python scripts/bench_matrix.py --blocks 3 --out m.json # the full matrix
    .venv/bin/python scripts/bench_matrix.py --clients httpx --modes stream --concurrency 32 \\
        --layout alternate --blocks 12                               # one cell, many rounds
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    CLIENT_NOTES,
    CLIENTS,
    SERVERS,
    EngineSettings,
    Load,
    Round,
    RoundStats,
    ServerProcess,
    Variant,
    background_cores,
    base_kind,
    builtin_model,
    cpu_seconds,
    machine,
    own_cpu_seconds,
    paired_ratio,
    run_load,
    scratch_dir,
    speaks_v1,
    spread,
    summarize_round,
    supports,
    wakeups,
)

Cell = tuple[str, str, int]  # client, mode, concurrency


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="aiohttp and httpx, streaming, concurrency 1 and 32, 2 blocks, smaller rounds",
    )
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"comma list of {', '.join(CLIENTS)}")
    parser.add_argument("--modes", default="stream,plain", help="stream and/or plain (non-streaming)")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma list of v4serve, vllm and variants v4serve@NAME (see --variant); ratios are to vllm",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:src=DIR|NAME:set=module.ATTR=VALUE",
        help="define v4serve@NAME: another source tree (e.g. an exported commit), or module attributes "
        "set before it starts, e.g. nopace:set=server.api.streaming.PACE_FROM_STREAMS=1000000",
    )
    parser.add_argument("--blocks", type=int, default=3, help="rounds of each cell on each server")
    parser.add_argument("--layout", choices=["sequential", "alternate"], default="alternate")
    parser.add_argument(
        "--rounds-per-session", type=int, default=1, help="sequential layout: rounds of each cell per server start"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--waves", type=int, default=3, help="requests per round = waves x concurrency ...")
    parser.add_argument("--min-requests", type=int, default=16, help="... but at least this many")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=None,
        metavar="CORES",
        help="before each round, wait until other processes use fewer cores than this",
    )
    parser.add_argument("--quiet-wait", type=float, default=120, metavar="S", help="for at most this long")
    parser.add_argument("--model", type=Path, help="model directory (default: the builtin tiny-llama)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    parser.add_argument("--trace-dir", type=Path, help="run the servers under bench_trace.py, traces here")
    parser.add_argument("--out", type=Path, help="write every round and the summary as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.modes, args.concurrency = "aiohttp,httpx", "stream", "1,32"
        args.blocks, args.waves, args.min_requests = min(args.blocks, 2), 2, 8
    return args


def cells_of(args: argparse.Namespace) -> list[Cell]:
    clients = [c for c in args.clients.split(",") if c]
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        raise SystemExit(f"unknown clients: {', '.join(sorted(unknown))}")
    modes = [m for m in args.modes.split(",") if m]
    return [(client, mode, int(c)) for c in args.concurrency.split(",") for mode in modes for client in clients]


def cell_name(cell: Cell) -> str:
    client, mode, concurrency = cell
    return f"{client}/{mode}/c{concurrency}"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = EngineSettings(
            model=args.model or builtin_model(),
            max_model_len=args.max_model_len,
            kv_cache_bytes=args.kv_cache_bytes,
            max_num_seqs=args.max_num_seqs,
        )
        self.scratch = scratch_dir()
        self.rounds: list[Round] = []
        self.servers: dict[str, ServerProcess] = {}
        self.v1: dict[str, bool] = {}
        self.variants = {v.name: v for v in map(Variant.parse, args.variant)}

    # ----- servers -----

    def start(self, kind: str) -> ServerProcess | None:
        trace = None
        if self.args.trace_dir is not None:
            self.args.trace_dir.mkdir(parents=True, exist_ok=True)
            trace = self.args.trace_dir / f"{kind}-{int(time.time())}.jsonl"
        variant = self.variants.get(kind.partition("@")[2]) if "@" in kind else None
        if "@" in kind and variant is None:
            raise SystemExit(f"{kind}: no --variant {kind.partition('@')[2]}:... given")
        server = ServerProcess(kind, self.settings, self.scratch, trace, variant)
        try:
            seconds = server.wait_ready()
        except RuntimeError as exc:
            print(f"# {kind} did not start: {exc}", flush=True)
            server.stop()
            return None
        self.v1[kind] = base_kind(kind) == "vllm" or speaks_v1(server.base_url)
        print(
            f"# {kind} ready in {seconds:.0f} s on port {server.port} (log {server.log_path}); "
            f"/v1: {'yes' if self.v1[kind] else 'no'}",
            flush=True,
        )
        self.servers[kind] = server
        return server

    def stop(self, kind: str) -> None:
        server = self.servers.pop(kind, None)
        if server is not None:
            server.stop()

    def own_pids(self) -> list[int]:
        return [pid for server in self.servers.values() for pid in server.pids()]

    # ----- rounds -----

    def run_round(self, kind: str, cell: Cell, block: int, cell_index: int, repeat: int = 0) -> None:
        client, mode, concurrency = cell
        server = self.servers.get(kind)
        if server is None or not server.alive:
            print(f"# {kind} is not running; restarting it", flush=True)
            self.stop(kind)
            server = self.start(kind)
        if server is None:
            self.record(kind, cell, block, math.nan, failed_stats("server not running"), math.nan, repeat)
            return
        for other, process in self.servers.items():
            process.freeze(other != kind)
        background = self.wait_for_quiet()
        stream = mode == "stream"
        requests = max(self.args.min_requests, self.args.waves * concurrency)
        # Both servers get the same prompts in the same block (so the same greedy tokens), and
        # no prompt is seen twice (no prefix-cache hits from the warm-up or earlier rounds).
        offset = ((cell_index * 1000 + block) * 10 + repeat) * 10_000
        protocol = base_kind(kind)
        warmup = Load(protocol, server.base_url, concurrency, min(concurrency, 8), 8, stream, offset + 5_000)
        load = Load(protocol, server.base_url, concurrency, requests, self.args.max_tokens, stream, offset)
        pids = server.pids()
        api, engine = [pids[0]], pids[1:]
        try:
            run_load(client, warmup)
            cpu0 = (own_cpu_seconds(), cpu_seconds(api), cpu_seconds(engine))
            woke0 = wakeups(api[0])
            records, wall = run_load(client, load)
            cpu1 = (own_cpu_seconds(), cpu_seconds(api), cpu_seconds(engine))
            woke1 = wakeups(api[0])
            server_cpu = cpu1[1] + cpu1[2] - cpu0[1] - cpu0[2]
            stats = summarize_round(records, wall, stream)
            if stats.tokens:
                per_token = [(b - a) * 1e6 / stats.tokens for a, b in zip(cpu0, cpu1, strict=True)]
                stats.client_us_per_token, stats.api_us_per_token, stats.engine_us_per_token = per_token
                stats.api_wakeups_per_token = (woke1 - woke0) / stats.tokens
        except Exception as exc:  # a round never takes the run down
            stats, server_cpu = failed_stats(f"{type(exc).__name__}: {exc}"), math.nan
        self.record(kind, cell, block, background, stats, server_cpu, repeat)

    def record(
        self, kind: str, cell: Cell, block: int, background: float, stats: RoundStats, cpu: float, repeat: int = 0
    ) -> None:
        self.rounds.append(Round(cell_name(cell), kind, block, background, stats, cpu, repeat))
        s = stats
        note = f"  errors {s.errors} ({s.first_error})" if s.errors else ""
        note += f"  retried {s.retried}" if s.retried else ""
        print(
            f"block {block + 1} {cell_name(cell):22s} {kind:8s} {s.tokens_per_s:8.0f} tok/s  "
            f"TTFT p50 {s.ttft_p50_ms:7.1f} ms p99 {s.ttft_p99_ms:7.1f}  TPOT {s.tpot_p50_ms:6.2f} ms  "
            f"end wait {s.end_wait_p50_ms:6.1f} ms  events/req {s.events_per_request:5.0f}  "
            f"cpu us/token client {s.client_us_per_token:5.0f} api {s.api_us_per_token:5.0f} "
            f"engine {s.engine_us_per_token:6.0f}  api wakeups/token {s.api_wakeups_per_token:4.2f}  "
            f"background {background:4.2f} cores{note}",
            flush=True,
        )

    def wait_for_quiet(self) -> float:
        background = background_cores(self.own_pids)
        if self.args.quiet_below is None:
            return background
        deadline = time.monotonic() + self.args.quiet_wait
        while background >= self.args.quiet_below and time.monotonic() < deadline:
            background = background_cores(self.own_pids, 2.0)
        return background

    # ----- layouts -----

    def run(self, cells: list[Cell], servers: list[str]) -> None:
        try:
            if self.args.layout == "alternate":
                for kind in servers:
                    self.start(kind)
                for block in range(self.args.blocks):
                    order = list(enumerate(cells)) if block % 2 == 0 else list(enumerate(cells))[::-1]
                    for position, (index, cell) in enumerate(order):
                        pair = servers if (block + position) % 2 == 0 else servers[::-1]
                        for kind in pair:
                            if supports(cell[0], kind, self.v1.get(kind, False)):
                                self.run_round(kind, cell, block, index)
            else:
                for block in range(self.args.blocks):
                    for kind in servers if block % 2 == 0 else servers[::-1]:
                        if self.start(kind) is None:
                            continue
                        order = list(enumerate(cells)) if block % 2 == 0 else list(enumerate(cells))[::-1]
                        for index, cell in order:
                            if supports(cell[0], kind, self.v1.get(kind, False)):
                                for repeat in range(self.args.rounds_per_session):
                                    self.run_round(kind, cell, block, index, repeat)
                        self.stop(kind)
        finally:
            for kind in list(self.servers):
                self.stop(kind)


def failed_stats(reason: str) -> RoundStats:
    return RoundStats(
        requests=0, errors=1, retried=0, tokens=0, wall_s=math.nan, tokens_per_s=math.nan, first_error=reason
    )


# ----- summary ---------------------------------------------------------------------------------

METRICS = [  # (field, label, better)
    ("tokens_per_s", "tok/s", "higher"),
    ("ttft_p50_ms", "TTFT p50 ms", "lower"),
    ("tpot_p50_ms", "TPOT p50 ms", "lower"),
    ("end_wait_p50_ms", "end wait p50 ms", "lower"),
    ("latency_p50_ms", "latency p50 ms", "lower"),
    ("events_per_request", "events per request", "lower"),
    ("client_us_per_token", "client CPU us/token", "lower"),
    ("api_us_per_token", "API process CPU us/token", "lower"),
    ("engine_us_per_token", "engine CPU us/token", "lower"),
    ("api_wakeups_per_token", "API process wakeups/token", "lower"),
]


def summarize(rounds: list[Round], cells: list[Cell], servers: list[str]) -> list[dict[str, Any]]:
    """One row per cell and server compared with vllm (each v4serve, variants included)."""
    rows = []
    baseline = "vllm"
    for cell in cells:
        name = cell_name(cell)
        # Rounds are paired by (block, repeat): the same prompts, at about the same time.
        by_server: dict[str, dict[tuple[int, int], list[Round]]] = {}
        for r in rounds:
            if r.cell == name and r.stats.errors == 0:
                by_server.setdefault(r.server, {}).setdefault((r.block, r.repeat), []).append(r)
        for server in [s for s in servers if s != baseline] or [baseline]:
            row: dict[str, Any] = {
                "cell": name,
                "client": cell[0],
                "mode": cell[1],
                "concurrency": cell[2],
                "server": server,
            }
            for field, _, _ in METRICS:
                for kind, label in ((server, "v4serve"), (baseline, "vllm")):
                    values = [getattr(r.stats, field) for rs in by_server.get(kind, {}).values() for r in rs]
                    row[f"{label}_{field}"] = spread(values)
                pairs = sorted(set(by_server.get(server, {})) & set(by_server.get(baseline, {})))
                a = [_median_of(by_server[server][p], field) for p in pairs]
                b_ = [_median_of(by_server[baseline][p], field) for p in pairs]
                row[f"ratio_{field}"] = paired_ratio(a, b_) if pairs else (math.nan,) * 3
            row["rounds"] = {
                "v4serve": sum(len(v) for v in by_server.get(server, {}).values()),
                "vllm": sum(len(v) for v in by_server.get(baseline, {}).values()),
            }
            row["failed_rounds"] = sum(
                1 for r in rounds if r.cell == name and r.server in (server, baseline) and r.stats.errors
            )
            rows.append(row)
    return rows


def _median_of(rounds: list[Round], field: str) -> float:
    values = sorted(getattr(r.stats, field) for r in rounds)
    return values[len(values) // 2] if values else math.nan


def _num(value: float, digits: int = 0) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def _spread(values: tuple[float, float, float], digits: int = 0) -> str:
    median, low, high = values
    if not math.isfinite(median):
        return "—"
    return f"{_num(median, digits)} ({_num(low, digits)}-{_num(high, digits)})"


def _ratio(values: tuple[float, float, float]) -> str:
    ratio, low, high = values
    if not math.isfinite(ratio):
        return "—"
    if not math.isfinite(low):
        return f"{ratio:.2f}"
    return f"{ratio:.2f} [{_bound(low)}, {_bound(high)}]"


def _bound(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0e}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: medians (min-max over rounds) and v4serve/vLLM ratios [95% CI]."""
    lines = [
        "| client | mode | c | server | v4serve tok/s | vLLM tok/s | tok/s ratio | v4serve TTFT p50 ms | vLLM TTFT p50 ms "
        "| TTFT ratio | TPOT ratio | end wait p50 ms v4serve / vLLM | events/req v4serve / vLLM | rounds |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        stream = row["mode"] == "stream"
        ttft_a = _spread(row["v4serve_ttft_p50_ms"]) if stream else "—"
        ttft_b = _spread(row["vllm_ttft_p50_ms"]) if stream else "—"
        rounds = f"{row['rounds']['v4serve']}/{row['rounds']['vllm']}"
        if row["failed_rounds"]:
            rounds += f" ({row['failed_rounds']} failed)"
        end_wait = (
            f"{_num(row['v4serve_end_wait_p50_ms'][0], 1)} / {_num(row['vllm_end_wait_p50_ms'][0], 1)}"
            if stream
            else "—"
        )
        events = (
            f"{_num(row['v4serve_events_per_request'][0])} / {_num(row['vllm_events_per_request'][0])}"
            if stream
            else "—"
        )
        lines.append(
            f"| {row['client']} | {row['mode']} | {row['concurrency']} | {row['server']} "
            f"| {_spread(row['v4serve_tokens_per_s'])} "
            f"| {_spread(row['vllm_tokens_per_s'])} | {_ratio(row['ratio_tokens_per_s'])} | {ttft_a} | {ttft_b} "
            f"| {_ratio(row['ratio_ttft_p50_ms']) if stream else '—'} "
            f"| {_ratio(row['ratio_tpot_p50_ms']) if stream else '—'} | {end_wait} | {events} | {rounds} |"
        )
    return "\n".join(lines)


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: where the CPU went, per output token (medians over rounds)."""
    lines = [
        "| client | mode | c | server | events/req | client us/token | API process us/token "
        "| engine us/token | API wakeups/token | vLLM: events/req | client | API process | engine | API wakeups |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cells = [row["client"], row["mode"], str(row["concurrency"]), row["server"]]
        for label in ("v4serve", "vllm"):
            cells += [_num(row[f"{label}_events_per_request"][0])] + [
                _num(row[f"{label}_{field}"][0])
                for field in ("client_us_per_token", "api_us_per_token", "engine_us_per_token")
            ]
            cells.append(_num(row[f"{label}_api_wakeups_per_token"][0], 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cells = cells_of(args)
    servers = [s for s in args.servers.split(",") if s]
    info = machine()
    print(
        f"# machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, kernel {info['kernel']}, "
        f"Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        flush=True,
    )
    print(f"# command: {' '.join(sys.argv)}", flush=True)
    bench = Bench(args)
    started = time.time()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGTERM too stops the servers (frozen ones included) and prints what was measured.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        bench.run(cells, servers)
    except KeyboardInterrupt:
        print("# interrupted: summarizing the rounds so far", flush=True)
    rows = summarize(bench.rounds, cells, servers)
    background = [r.background_cores for r in bench.rounds if math.isfinite(r.background_cores)]
    print()
    print(
        f"{args.layout} layout, {args.blocks} blocks, {args.max_tokens} greedy tokens per request, "
        f"rounds of max({args.min_requests}, {args.waves} x c) requests; {time.time() - started:.0f} s; "
        f"background load median {spread(background)[0]:.2f} cores (max {spread(background)[2]:.2f})"
    )
    print(
        "medians over rounds (min-max); ratios are v4serve/vLLM, geometric mean of paired rounds "
        "[95% CI]; targets: tok/s ratio >= 1.00, TTFT ratio <= 1.05, TPOT ratio at c=1 <= 1.05"
    )
    print()
    print(table(rows))
    print()
    print("CPU per output token (medians over rounds; the engine's includes its spinning while it waits):")
    print()
    print(cost_table(rows))
    print()
    for client in dict.fromkeys(c[0] for c in cells):
        print(f"- {client}: {CLIENT_NOTES[client]}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": info,
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "engine": {k: str(v) for k, v in asdict(bench.settings).items()},
                    "rounds": [r.to_json() for r in bench.rounds],
                    "summary": rows,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
