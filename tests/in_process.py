"""The real application in this process, around stand-in engines: the fast test layer.

``serve_in_process`` builds the application exactly as ``v4serve serve`` does
(``server.api.create_app`` with a ``Settings`` and a registry), runs its lifespan (which
``httpx.ASGITransport`` does not), and hands out clients that call it through
``httpx.ASGITransport``: every middleware, route, error handler, the service and the real
``EnginePool`` run as in production. Only the engines are stand-ins (``StandInEngine``),
started through ``create_app(..., starters=...)``, so a request costs microseconds instead of a
model. Such tests run in milliseconds, as vLLM tests its serving classes.

What the HTTP edge does (authentication, errors and their JSON, body limits, SSE
framing, routes, validation, account attribution, readiness) is tested here. What needs a
model (outputs, token counts, stop sequences, engine failures, disconnect aborts) is
tested against the real engine, in the ``slow`` layer (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from scale_gp import AsyncSGPClient

from server.api import create_app
from server.engines.base import (
    AdapterRef,
    Engine,
    EngineStats,
    GenerationDelta,
    LaunchOptions,
    PreparedRequest,
    SamplingOptions,
)
from server.engines.rules import fit_to_context
from server.errors import EngineError
from server.registry import ModelEntry, Registry, load_registry
from server.settings import Settings
from server.weights import BUILTIN_PREFIX
from tests.conftest import API_KEY, API_KEYS

BASE_URL = "http://testserver"


def _word(token_id: int) -> str:
    """The stand-in tokenizer's text for a token ID."""
    return f" w{token_id}"


class StandInEngine(Engine):
    """Answers every request with ``max_tokens`` words (`` w0 w1 ...``, token ``i`` is
    `` wi``), one per step.

    A text prompt counts one token per whitespace-separated word, plus one for BOS when
    special tokens are added; the context-length rule is the real engines' own
    (``fit_to_context``). What reached the engine is recorded, so a test can tell a
    request refused at the door from one the engine saw.
    """

    def __init__(self, model_id: str, max_model_len: int = 2048):
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.prepared: list[PreparedRequest] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        # Raised by ``generate`` after this many deltas: an engine failing mid-request.
        self.fail_after: int | None = None

    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return f"<s>{turns}<|assistant|>\n"

    async def prepare(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
        images: Sequence[Any] = (),
    ) -> PreparedRequest:
        prompt_tokens = len(prompt.split()) + int(add_special_tokens) if isinstance(prompt, str) else len(prompt)
        sampling = fit_to_context(self.model_id, self.max_model_len, prompt_tokens, sampling)
        prepared = PreparedRequest(
            prompt_tokens, sampling, engine_input=prompt, adapter=adapter, prompt_token_ids=range(prompt_tokens)
        )
        self.prepared.append(prepared)
        return prepared

    async def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(map(_word, token_ids))

    async def generate(
        self, request: PreparedRequest, request_id: str, *, stream: bool = True
    ) -> AsyncGenerator[GenerationDelta, None]:
        self.running.add(request_id)
        try:
            count = request.sampling.max_tokens
            for i in range(count):
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineError("the stand-in engine failed")
                await asyncio.sleep(0)  # a step: other requests run meanwhile
                finish = "length" if i == count - 1 else None
                yield GenerationDelta(_word(i), request.prompt_tokens, i + 1, finish, token_ids=(i,))
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running))

    async def shutdown(self) -> None:
        self.running.clear()


@dataclass
class InProcessServer:
    """The application, and the stand-in engines the pool started (by model ID).

    Every engine start waits for ``starts`` to be set, so a test can hold a model in
    ``loading``.
    """

    app: FastAPI
    engines: dict[str, StandInEngine]
    starts: asyncio.Event

    def client(self, api_key: str | None = API_KEY, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client calling the application in process; ``x-api-key`` when given."""
        headers = {"x-api-key": api_key} if api_key else {}
        headers.update(kwargs.pop("headers", {}))
        transport = httpx.ASGITransport(self.app, raise_app_exceptions=kwargs.pop("raise_app_exceptions", True))
        return httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=headers, **kwargs)

    def sdk(self, api_key: str = API_KEY) -> AsyncSGPClient:
        """The public ``scale-gp`` SDK, calling the application in process."""
        http = httpx.AsyncClient(transport=httpx.ASGITransport(self.app))
        return AsyncSGPClient(api_key=api_key, base_url=BASE_URL, max_retries=0, http_client=http)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until ``/readyz`` answers 200 (the preloaded models are loaded)."""

        async def ready() -> None:
            async with self.client(api_key=None) as http:
                while (await http.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)

        await asyncio.wait_for(ready(), timeout)


def asgi_post_scope(path: str, headers: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope for a POST to ``path``: for a test that calls the application
    itself, to choose when (or whether) the body arrives."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "state": {},
    }


@functools.cache
def cached_registry(*overlays: Path) -> Registry:
    """The shipped registry with ``overlays`` laid over it; loaded once per set of files
    (a registry never changes once loaded, and loading the shipped one takes a while)."""
    return load_registry(overlays)


@contextlib.asynccontextmanager
async def serve_in_process(
    home: Path,
    *,
    registry: Registry | None = None,
    api_keys: str = API_KEYS,
    preload: Sequence[str] = (),
    hold_starts: bool = False,
    **settings: Any,
) -> AsyncIterator[InProcessServer]:
    """The application of ``v4serve serve`` with these settings, its lifespan running.

    ``api_keys`` as ``V4SERVE_API_KEYS`` takes them (empty: an open server); other
    ``Settings`` fields by name. With ``preload`` the context is entered once the models
    are loaded, unless ``hold_starts``: then every engine start waits for
    ``server.starts.set()``.
    """
    registry = registry if registry is not None else cached_registry()
    # The stand-in reads no weights: an empty directory stands for each builtin model,
    # so the pool resolves its source without generating it.
    for registered in registry:
        source = registered.entry.source or registered.entry.adapter or ""
        if source.startswith(BUILTIN_PREFIX):
            (home / "builtin" / source[len(BUILTIN_PREFIX) :]).mkdir(parents=True, exist_ok=True)
    engines: dict[str, StandInEngine] = {}
    starts = asyncio.Event()
    if not hold_starts:
        starts.set()

    async def start(
        model_id: str, entry: ModelEntry, weights: str, adapters: Sequence[AdapterRef], launch: LaunchOptions
    ) -> StandInEngine:
        await starts.wait()
        engines[model_id] = StandInEngine(model_id, entry.max_model_len or 2048)
        return engines[model_id]

    with pytest.MonkeyPatch.context() as patch:
        # Settings read V4SERVE_* variables: only what the test passes counts.
        for name in list(os.environ):
            if name.startswith("V4SERVE_"):
                patch.delenv(name)
        config = Settings(api_keys=api_keys, home=home, preload=list(preload), **settings)
    app = create_app(config, registry, starters={"vllm": start, "transformers": start})
    server = InProcessServer(app, engines, starts)
    async with app.router.lifespan_context(app):
        if preload and not hold_starts:
            await server.wait_ready()
        yield server
