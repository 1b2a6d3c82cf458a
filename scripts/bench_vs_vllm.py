"""The former single-cell benchmark, kept for its command line: now one cell of bench_matrix.py.

    .venv/bin/python scripts/bench_vs_vllm.py --concurrency 32 --rounds 4

is ``bench_matrix.py --clients aiohttp --modes stream --concurrency 32 --blocks 4``: aiohttp
streaming against both servers, rounds alternating, medians and ratios with confidence
intervals. ``--client httpx`` (or ``sdk``) picks another client. See bench_matrix.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", default="aiohttp", choices=["aiohttp", "httpx", "sdk"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (blocks)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    argv = [
        "--clients",
        args.client,
        "--modes",
        "stream",
        "--concurrency",
        str(args.concurrency),
        "--blocks",
        str(args.rounds),
        "--max-tokens",
        str(args.max_tokens),
    ]
    if args.model:
        argv += ["--model", str(args.model)]
    if args.out:
        argv += ["--out", str(args.out)]
    return bench_matrix.main(argv)


if __name__ == "__main__":
    sys.exit(main())
