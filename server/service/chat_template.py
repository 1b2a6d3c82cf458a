"""Rendering a caller's own chat template, safely: in worker processes, with limits.

``TemplateRenderer.render`` hands the template and its variables to a worker process
(``server/service/_template_worker.py``: Jinja's ``ImmutableSandboxedEnvironment``, a
memory limit, the output counted) and waits at most ``timeout`` seconds for the text. A
worker that outruns it is killed and replaced; the caller gets a 400 that says why, as for
a template that fails to compile, raises, reaches for Python's internals or renders more
than ``max_chars``. The server's own process never runs the caller's template.

Workers start on the first render (a fraction of a second: they import only Jinja) and
stay for the next ones, at most ``workers`` of them, so a slow template holds one worker
while the others serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from server.errors import InvalidRequestError

logger = logging.getLogger(__name__)

WORKER = Path(__file__).resolve().with_name("_template_worker.py")
# The longest rendered prompt, in characters: more than any model's context holds.
MAX_RENDERED_CHARS = 2_000_000
# How long one render may take. Chat templates render in milliseconds.
RENDER_TIMEOUT = 5.0
# How long a worker may take to start (Python and Jinja imported) on a busy machine.
START_TIMEOUT = 60.0
WORKERS = 2
PARAM = "chat_template"


class TemplateRenderer:
    def __init__(self, *, workers: int = WORKERS, timeout: float = RENDER_TIMEOUT, max_chars: int = MAX_RENDERED_CHARS):
        self.timeout = timeout
        self.max_chars = max_chars
        self._workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    async def render(self, template: str, context: dict[str, Any]) -> str:
        """``template`` rendered with ``context``; ``InvalidRequestError`` (400, param
        ``chat_template``) when it cannot be, whatever the reason."""
        if self._closed:
            raise RuntimeError("the template renderer is closed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        async with self._slots:
            worker = self._idle.pop() if self._idle else await _Worker.start(self.max_chars)
            self._busy.add(worker)
            healthy = False
            try:
                answer = await worker.ask(
                    {"template": template, "context": context, "max_chars": self.max_chars}, self.timeout
                )
                healthy = "failed" not in answer
            finally:
                self._busy.discard(worker)
                if healthy and not self._closed:
                    self._idle.append(worker)
                else:
                    await worker.stop()
        if "text" in answer and isinstance(answer["text"], str):
            return answer["text"]
        raise InvalidRequestError(
            f"the chat template cannot be rendered: {answer.get('error', 'no answer')}", param=PARAM
        )

    async def close(self) -> None:
        self._closed = True
        workers, self._idle = [*self._idle, *self._busy], []
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process):
        self._process = process

    @classmethod
    async def start(cls, max_chars: int) -> _Worker:
        # -I: none of the caller's PYTHON* variables, no user site, not the working directory.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(WORKER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            # A line of the answer: the text JSON-escaped (up to 12 bytes a character).
            limit=16 * max_chars + 65536,
        )
        worker = cls(process)
        try:
            ready = await asyncio.wait_for(worker._read(), START_TIMEOUT)
        except BaseException:
            await worker.stop()
            raise
        if ready.get("ready") is not True:
            await worker.stop()
            raise RuntimeError("the chat template worker did not start")
        return worker

    async def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            raise EOFError("the chat template worker ended")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError("the chat template worker answered something other than an object")
        return answer

    async def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The worker's answer to ``request``; an error answer when the worker did not
        give one in time or died (then it must not be asked again)."""
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            return await asyncio.wait_for(self._drain_and_read(), timeout)
        except asyncio.TimeoutError:
            return _failure(f"it took longer than {timeout:g} s to render")
        except (EOFError, ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            # The worker died (its memory limit), or sent more than a rendered prompt can be.
            logger.warning("chat template worker failed: %s", type(exc).__name__)
            return _failure("it needs more memory or output than a template may use")

    async def _drain_and_read(self) -> dict[str, Any]:
        assert self._process.stdin is not None
        await self._process.stdin.drain()
        return await self._read()

    async def stop(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        with contextlib.suppress(Exception):
            await self._process.wait()


def _failure(message: str) -> dict[str, Any]:
    # Not "text": the renderer then drops the worker, which may be stuck or dead.
    return {"error": message, "failed": True}
