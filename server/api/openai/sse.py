"""Server-sent events in OpenAI's framing, as vLLM's server sends them.

Each chunk is ``data: <JSON>``, and the stream ends with ``data: [DONE]``. A failure after
the first byte can no longer change the status: it is sent in the stream, as
``data: {"error": {...}}`` followed by ``data: [DONE]``, which the ``openai`` SDK raises
as an ``APIError``. The last frame goes out with the end of the body
(``server.api.streaming.EventStreamResponse``, which also aborts the engine requests
when the client goes away).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from server.api.errors import error_body, serving_error_body
from server.api.streaming import LastEvent
from server.errors import ServingError

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


async def openai_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """The SSE frames of ``chunks`` (each dumped with the fields it was built with), then
    ``[DONE]`` as the last frame."""
    failure: dict[str, Any] | None = None
    try:
        async for chunk in chunks:
            yield b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"
    except ServingError as exc:
        failure = serving_error_body(exc)
    except Exception:
        logger.exception("stream failed after it began")
        failure = error_body("internal server error", "internal_error", 500)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if failure is not None:
        yield b"data: " + json.dumps(failure).encode() + b"\n\n"
    yield LastEvent(DONE)
