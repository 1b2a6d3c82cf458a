"""An input file of batch requests, read and checked line by line.

Each line is an OpenAI batch request, ``{"custom_id", "method": "POST", "url", "body"}``.
What can be judged from the line alone is judged here: a line that is not JSON, has no
``custom_id`` (or repeats an earlier one), another method, or a URL this server does not
serve becomes a ``LineFault``, answered with an error line and never run. The body is left
to the endpoint (``server.batch.endpoints``), which validates it as the HTTP route does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The routes a batch line may name; each is answered as its HTTP route answers it.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v4/completions", "/v4/chat-completions")
# A custom_id longer than this is refused, as OpenAI's batch API refuses one over 512 characters.
MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A request line that may run: its 1-based line number in the input, and what it asks."""

    number: int
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        """The model the body names, if it names one as a string (else validation refuses it)."""
        model = self.body.get("model")
        return model if isinstance(model, str) else None


@dataclass(frozen=True, slots=True)
class LineFault:
    """A line that cannot run, and why (``code`` as OpenAI's batch errors name them)."""

    number: int
    custom_id: str | None
    code: str
    message: str


def read_input(path: Path) -> list[BatchLine | LineFault]:
    """Every non-blank line of ``path``, checked (a line that is not UTF-8 JSON is a fault);
    ``OSError`` if the file cannot be read."""
    with path.open("rb") as file:
        return list(check_lines(file))


def check_lines(raw_lines: Iterable[bytes], endpoint: str | None = None) -> Iterator[BatchLine | LineFault]:
    """Each non-blank line checked, in order; a ``custom_id`` seen before makes a fault.
    With ``endpoint``, every line must name that URL (the HTTP batch API's rule)."""
    seen: set[str] = set()
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        checked = _check(number, raw, endpoint)
        if isinstance(checked, BatchLine):
            if checked.custom_id in seen:
                checked = LineFault(
                    number,
                    checked.custom_id,
                    "duplicate_custom_id",
                    f"custom_id '{checked.custom_id}' was used by an earlier line; each line needs its own",
                )
            else:
                seen.add(checked.custom_id)
        yield checked


def _check(number: int, raw: bytes, endpoint: str | None) -> BatchLine | LineFault:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return LineFault(number, None, "invalid_json_line", f"line {number} is not valid JSON: {exc}")
    if not isinstance(line, dict):
        return LineFault(number, None, "invalid_request", f"line {number} is not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineFault(number, None, "missing_custom_id", f"line {number} has no custom_id (a non-empty string)")
    if len(custom_id) > MAX_CUSTOM_ID:
        return LineFault(
            number, None, "invalid_custom_id", f"line {number}: custom_id is over {MAX_CUSTOM_ID} characters"
        )
    method = line.get("method", "POST")
    if method != "POST":
        return LineFault(number, custom_id, "invalid_method", f"line {number}: method must be POST, not {method!r}")
    url = line.get("url")
    if url not in ENDPOINTS:
        return LineFault(
            number, custom_id, "invalid_url", f"line {number}: url {url!r} is not one of {', '.join(ENDPOINTS)}"
        )
    if endpoint is not None and url != endpoint:
        return LineFault(
            number,
            custom_id,
            "mismatched_url",
            f"line {number}: url {url} differs from the batch's endpoint {endpoint}",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        return LineFault(number, custom_id, "invalid_body", f"line {number}: body must be a JSON object")
    return BatchLine(number, custom_id, url, body)
