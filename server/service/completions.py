"""The completions service: a contract request in, contract responses out.

``prepare`` does everything that can fail before the first token (model lookup, engine
load, prompt building, tokenization, parameter checks), so the HTTP layer can still
answer with a proper status even for a streaming request. The returned
``PendingCompletion`` then produces either one response or a stream of chunks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing

from server.errors import InvalidRequestError, ServingError
from server.pool import Engine, EnginePool, GenerationDelta, Lease, PreparedRequest, SamplingOptions
from server.protocol.v4 import Completion, CompletionRequest, CompletionResponse, TokenUsage
from server.registry import ModelEntry
from server.service.images import EncodedImage, ImagePolicy, PixelBudget, decode_images, read_images
from server.service.prompts import BuiltPrompt, build_prompt
from server.service.sampling import sampling_options

logger = logging.getLogger(__name__)


class PendingCompletion:
    """A validated request whose tokens have not been generated yet.

    It holds the request's lease on the engine until ``close``, which its owner must call
    however the request ends: generation may never start if the client leaves first.
    """

    def __init__(self, lease: Lease, prepared: PreparedRequest, request_id: str, account_id: str | None):
        self._lease = lease
        self._engine = lease.engine
        self._prepared = prepared
        self.request_id = request_id
        self._account_id = account_id

    def close(self) -> None:
        self._lease.release()

    async def result(self) -> CompletionResponse:
        pieces: list[str] = []
        last: GenerationDelta | None = None
        async for last in self._deltas(stream=False):
            pieces.append(last.text)
        assert last is not None, "an engine ends every request with a final delta"
        return _response("".join(pieces), last, final=True)

    async def chunks(self) -> AsyncIterator[CompletionResponse]:
        """One chunk per engine step; the last carries finish_reason and token usage."""
        async for delta in self._deltas(stream=True):
            yield _response(delta.text, delta, final=delta.finish_reason is not None)

    async def _deltas(self, *, stream: bool) -> AsyncGenerator[GenerationDelta, None]:
        last: GenerationDelta | None = None
        outcome = "aborted: the client went away"
        try:
            # aclosing: a caller that stops listening closes the engine's generator at
            # once, which aborts the request in the engine instead of at garbage collection.
            async with aclosing(self._engine.generate(self._prepared, self.request_id, stream=stream)) as deltas:
                async for last in deltas:
                    yield last
            outcome = f"finish={last.finish_reason if last else None}"
        except ServingError as exc:
            outcome = f"failed: {exc.message}"
            await self._abort()
            raise
        except Exception as exc:
            outcome = f"failed: {type(exc).__name__}"
            await self._abort()
            raise
        finally:
            self._log(last, outcome)

    async def _abort(self) -> None:
        """Take a failed request out of its engine.

        Whatever failed after the request was handed over (the engine refused a value
        late, the stream broke), the engine may still count it as running: an engine that
        never forgets it would hold a batch slot forever and could never be evicted.
        Aborting an ID the engine no longer knows is harmless.
        """
        if not self._engine.alive:
            return  # a dead engine holds nothing; the pool restarts it
        try:
            await self._engine.abort(self.request_id)
        except Exception:
            logger.exception("aborting failed request %s", self.request_id)

    def _log(self, last: GenerationDelta | None, outcome: str) -> None:
        logger.info(
            "completion %s model=%s account=%s prompt_tokens=%d completion_tokens=%d %s",
            self.request_id,
            # Usage is per served model: an adapter's, not its base's.
            self._prepared.adapter or self._engine.model_id,
            # The account may come from the caller: quoted unless a plain token, so it can
            # neither start a forged line nor add forged fields to this one.
            _log_token(self._account_id) if self._account_id else "-",
            self._prepared.prompt_tokens,
            last.completion_tokens if last is not None else 0,
            _log_text(outcome),
        )


_PLAIN_TOKEN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@:+/")


def _log_token(value: str) -> str:
    """``value`` as is when it is a plain token, else its ``repr`` (quoted, escaped)."""
    return value if all(char in _PLAIN_TOKEN for char in value) else repr(value)


def _log_text(text: str) -> str:
    """Free text with its control characters (newlines included) backslash-escaped."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _response(text: str, delta: GenerationDelta, *, final: bool) -> CompletionResponse:
    # model_construct skips re-validation: these values come from the engine, and this
    # runs once per streamed token.
    usage = (
        TokenUsage.model_construct(
            prompt=delta.prompt_tokens,
            completion=delta.completion_tokens,
            total=delta.prompt_tokens + delta.completion_tokens,
        )
        if final
        else None
    )
    return CompletionResponse.model_construct(
        completion=Completion.model_construct(text=text, finish_reason=delta.finish_reason, response_metadata=None),
        token_usage=usage,
    )


class CompletionService:
    def __init__(self, pool: EnginePool, image_policy: ImagePolicy):
        self._pool = pool
        self._image_policy = image_policy
        self._pixels = PixelBudget(image_policy.decoded_pixels)

    async def prepare(self, request: CompletionRequest, account_id: str | None = None) -> PendingCompletion:
        registered = self._pool.lookup(request.model)
        images = await self._images(request, registered.entry)
        lease = await self._pool.lease(request.model)
        try:
            engine = lease.engine
            prompt = build_prompt(request.prompt, registered.entry, engine, images=len(images))
            options = sampling_options(request.model_parameters, registered.entry)
            # A LoRA entry is served by its base's engine, which knows the adapter by its model ID.
            adapter = registered.model_id if registered.entry.is_adapter else None
            prepared = await self._engine_input(engine, prompt, options, adapter, images)
        except BaseException:
            lease.release()
            raise
        request_id = f"cmpl-{uuid.uuid4().hex}"
        # ``account_id`` is decided by the HTTP layer, which knows whether the caller's key
        # is bound to an account (then it wins over ``request.account_id``): see
        # ``server.api.auth.Caller.usage_account``.
        return PendingCompletion(lease, prepared, request_id, account_id)

    async def _images(self, request: CompletionRequest, entry: ModelEntry) -> list[EncodedImage]:
        """The request's images, read and checked before an engine is leased: a refused
        image then costs no model load and takes no place in the model's queue. They stay
        encoded while the request waits: a few KB can decode to a hundred MB."""
        if not request.images:
            return []
        if entry.vision is None:
            raise InvalidRequestError(
                f"model '{request.model}' does not accept images; send images only to a vision model",
                param="images",
            )
        images = await read_images(request.images, self._image_policy, max_images=entry.vision.max_images)
        self._pixels.check(sum(image.pixels for image in images))
        return images

    async def _engine_input(
        self,
        engine: Engine,
        prompt: BuiltPrompt,
        options: SamplingOptions,
        adapter: str | None,
        images: Sequence[EncodedImage],
    ) -> PreparedRequest:
        """The engine's input, the images decoded only now that the request holds its engine
        slot, within the server's pixel budget (429 past it). The pixels are reserved until
        the engine has turned them into its own tensors; once this returns, nothing refers
        to the decoded images any more."""
        with self._pixels.hold(sum(image.pixels for image in images)):
            decoded = await decode_images(images, self._image_policy)
            return await engine.prepare(
                prompt.text, options, add_special_tokens=prompt.add_special_tokens, adapter=adapter, images=decoded
            )
