"""An input file of batch requests, read and checked line by line.

Each line is an OpenAI batch request, ``{"custom_id", "method": "POST", "url", "body"}``.
What can be judged from the line alone is judged here: a line that is not JSON, has no
``custom_id`` (or repeats an earlier one), another method, or a URL this server does not
serve becomes a ``LineFault``, answered with an error line and never run. The body is left
to the endpoint (``server.batch.endpoints``), which validates it as the HTTP route does.

An input file may hold millions of requests. ``read_input`` keeps of each line only what
the job plans by (its number, ``custom_id``, URL, model) and where the line is in the
file; the line is read again when it runs, so a job holds the bodies of the lines in
flight, not of the whole file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The routes a batch line may name; each is answered as its HTTP route answers it.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v4/completions", "/v4/chat-completions")
# A custom_id longer than this is refused, as OpenAI's batch API refuses one over 512 characters.
MAX_CUSTOM_ID = 512


class InputChangedError(RuntimeError):
    """A line read again when it runs is not the line checked at the job's start."""


@dataclass(frozen=True, slots=True)
class InputSpan:
    """Where a line is in the input file."""

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            return file.read(self.length)


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A request line that may run: its 1-based line number in the input, what it asks,
    and the line itself (``source``: as read, or where it is in the input file)."""

    number: int
    custom_id: str
    url: str
    # The model the body names, if it names one as a string (else validation refuses it).
    model: str | None
    source: bytes | InputSpan

    @classmethod
    def of(cls, number: int, custom_id: str, url: str, body: dict[str, Any]) -> BatchLine:
        """A line asking ``url`` for ``body``, as if read from a file."""
        raw = json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()
        model = body.get("model")
        return cls(number, custom_id, url, model if isinstance(model, str) else None, raw)

    @property
    def body(self) -> dict[str, Any]:
        """The request's body, parsed anew from the line (read again from the file if need be)."""
        try:
            line = json.loads(self.raw())
        except ValueError:
            line = None
        if not isinstance(line, dict) or line.get("custom_id") != self.custom_id:
            raise InputChangedError(f"line {self.number} of the input changed while the job ran")
        body: dict[str, Any] = line["body"]
        return body

    def raw(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read()

    def carried(self) -> BatchLine:
        """This line holding its own bytes: for a process that cannot read the input file."""
        return self if isinstance(self.source, bytes) else dataclasses.replace(self, source=self.source.read())


@dataclass(frozen=True, slots=True)
class LineFault:
    """A line that cannot run, and why (``code`` as OpenAI's batch errors name them)."""

    number: int
    custom_id: str | None
    code: str
    message: str


def read_input(path: Path, endpoint: str | None = None) -> list[BatchLine | LineFault]:
    """Every non-blank line of ``path``, checked (a line that is not UTF-8 JSON is a fault),
    each ``BatchLine`` pointing into the file rather than holding its bytes; ``OSError`` if
    the file cannot be read. ``endpoint`` as for ``check_lines``."""
    with path.open("rb") as file:
        return list(check_lines(file, endpoint, path=path))


def check_lines(
    raw_lines: Iterable[bytes], endpoint: str | None = None, *, path: Path | None = None
) -> Iterator[BatchLine | LineFault]:
    """Each non-blank line checked, in order; a ``custom_id`` seen before makes a fault.
    With ``endpoint``, every line must name that URL (the HTTP batch API's rule). With
    ``path`` (the file ``raw_lines`` are read from), each ``BatchLine`` holds where its
    line is in that file instead of the line."""
    seen: set[str] = set()
    offset = 0
    for number, raw in enumerate(raw_lines, start=1):
        start, offset = offset, offset + len(raw)
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
                if path is not None:
                    checked = dataclasses.replace(checked, source=InputSpan(path, start, len(raw)))
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
    model = body.get("model")
    # One string object per URL and per model name, however many lines name them.
    url = ENDPOINTS[ENDPOINTS.index(url)]
    return BatchLine(number, custom_id, url, sys.intern(model) if isinstance(model, str) else None, raw)
