"""The completions service: one path from any API's request to the engine and back.

``prepare_generation`` does everything that can fail before the first token (model lookup,
images, engine load, prompt building, tokenization, parameter checks), so the HTTP layer
can still answer with a proper status even for a streaming request. The returned
``PendingGeneration`` then produces either one result or a stream of deltas. Each API maps
its wire types to a ``GenerationRequest`` and shapes its responses from those results: the
hosted contract here (``prepare`` and ``PendingCompletion``), the OpenAI-compatible routes
in ``server.service.openai``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from server import telemetry
from server.errors import InvalidRequestError
from server.pool import Engine, EnginePool, PreparedRequest, SamplingOptions
from server.protocol.v4 import Completion, CompletionRequest, CompletionResponse, Image, TokenUsage
from server.registry import ModelEntry
from server.service.generation import Choice, ChoiceDelta, PendingGeneration
from server.service.images import EncodedImage, ImagePolicy, PixelBudget, decode_images, read_images
from server.service.prompts import EnginePrompt, engine_prompt
from server.service.requests import (
    ChatPrompt,
    GenerationRequest,
    ImageInput,
    ImagePart,
    Prompt,
    TextPrompt,
    TokenPrompt,
)
from server.service.sampling import sampling_options, v4_sampling

# Below this temperature sampling is greedy (vLLM's threshold): n > 1 would only repeat one answer.
GREEDY_BELOW = 1e-5
# The most choices (prompts x n) one request may ask for: all run under one engine lease.
MAX_CHOICES = 1024
# A seed stays a signed 64-bit integer when a choice adds its index.
_SEED_SPAN = 2**64
_SEED_MAX = 2**63 - 1


class PendingCompletion:
    """A ``/v4/completions`` request whose tokens have not been generated yet.

    It holds the request's lease on the engine until ``close``, which its owner must call
    however the request ends: generation may never start if the client leaves first.
    """

    def __init__(self, pending: PendingGeneration):
        self._pending = pending
        self.request_id = pending.request_id

    def close(self) -> None:
        self._pending.close()

    async def result(self) -> CompletionResponse:
        result = await self._pending.result()
        (choice,) = result.choices
        return _response(choice.text, choice.finish_reason, choice.prompt_tokens, choice.completion_tokens, final=True)

    async def chunks(self) -> AsyncIterator[CompletionResponse]:
        """One chunk per engine step; the last carries finish_reason and token usage."""
        async with aclosing(self._pending.stream()) as deltas:
            async for delta in deltas:
                yield _v4_chunk(delta)


def _v4_chunk(delta: ChoiceDelta) -> CompletionResponse:
    final = delta.finish_reason is not None
    return _response(delta.text, delta.finish_reason, delta.prompt_tokens, delta.completion_tokens, final=final)


def _response(
    text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, *, final: bool
) -> CompletionResponse:
    # model_construct skips re-validation: these values come from the engine, and this
    # runs once per streamed token.
    usage = (
        TokenUsage.model_construct(
            prompt=prompt_tokens, completion=completion_tokens, total=prompt_tokens + completion_tokens
        )
        if final
        else None
    )
    return CompletionResponse.model_construct(
        completion=Completion.model_construct(text=text, finish_reason=finish_reason, response_metadata=None),
        token_usage=usage,
    )


class CompletionService:
    def __init__(self, pool: EnginePool, image_policy: ImagePolicy):
        self._pool = pool
        self._image_policy = image_policy
        self._pixels = PixelBudget(image_policy.decoded_pixels)

    async def prepare(self, request: CompletionRequest, account_id: str | None = None) -> PendingCompletion:
        """A ``/v4/completions`` request.

        ``account_id`` is decided by the HTTP layer, which knows whether the caller's key is
        bound to an account (then it wins over ``request.account_id``): see
        ``server.api.auth.Caller.usage_account``.
        """
        generation = GenerationRequest(
            model=request.model,
            prompts=(TextPrompt(request.prompt, as_registered=True),),
            sampling=v4_sampling(request.model_parameters),
            images=tuple(
                ImageInput(image.image_url, f"images[{index}].image_url")
                for index, image in enumerate(request.images or ())
            ),
        )
        return PendingCompletion(await self.prepare_generation(generation, account_id))

    async def prepare_generation(self, request: GenerationRequest, account_id: str | None = None) -> PendingGeneration:
        """Any API's request, ready to generate; the caller must ``close`` what it returns."""
        registered = self._pool.lookup(request.model)
        telemetry.serving(registered.model_id, account_id)
        entry = registered.entry
        _check_request(request)
        images = await self._images(request, entry)
        echo_only = request.echo and request.sampling.max_tokens == 0
        logprobs = request.sampling.logprobs
        options = sampling_options(
            request.sampling,
            entry,
            # Echo with logprobs returns the prompt tokens' too, with as many alternatives.
            prompt_logprobs=logprobs if request.echo else None,
            echo_only=echo_only,
        )
        lease = await self._pool.lease(request.model)
        try:
            engine = lease.engine
            # A LoRA entry is served by its base's engine, which knows the adapter by its model ID.
            adapter = registered.model_id if entry.is_adapter else None
            prepared: list[PreparedRequest] = []
            echoes: list[str | None] = []
            for prompt in request.prompts:
                built = await engine_prompt(prompt, entry, engine, images=len(images))
                prepared.append(await self._engine_input(engine, built, options, adapter, images))
                echoes.append(await _echo_text(prompt, engine) if request.echo else None)
        except BaseException:
            lease.release()
            raise
        request_id = telemetry.engine_request_id(request.id_prefix)
        choices = [
            Choice(
                index=prompt_index * request.n + sample,
                prompt_index=prompt_index,
                request=_with_seed(base, sample),
                # One engine request keeps the request's ID; several are told apart by index.
                request_id=request_id
                if len(prepared) * request.n == 1
                else f"{request_id}-{prompt_index * request.n + sample}",
                echo=echo,
            )
            for prompt_index, (base, echo) in enumerate(zip(prepared, echoes, strict=True))
            for sample in range(request.n)
        ]
        return PendingGeneration(
            lease,
            choices,
            request_id=request_id,
            model_id=registered.model_id,
            account_id=account_id,
            logprobs=logprobs is not None,
            echo_only=echo_only,
            created=int(time.time()),
        )

    async def _images(self, request: GenerationRequest, entry: ModelEntry) -> list[EncodedImage]:
        """The request's images, read and checked before an engine is leased: a refused
        image then costs no model load and takes no place in the model's queue. They stay
        encoded while the request waits: a few KB can decode to a hundred MB."""
        wanted = _image_inputs(request)
        if not wanted:
            return []
        if entry.vision is None:
            raise InvalidRequestError(
                f"model '{request.model}' does not accept images; send images only to a vision model",
                param="images" if request.images else wanted[0].param,
            )
        with telemetry.phase("image fetch"):
            images = await read_images(
                [Image(image_url=image.url) for image in wanted],
                self._image_policy,
                max_images=entry.vision.max_images,
                params=[image.param for image in wanted],
                count_param="images" if request.images else "messages",
            )
        self._pixels.check(sum(image.pixels for image in images))
        return images

    async def _engine_input(
        self,
        engine: Engine,
        prompt: EnginePrompt,
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
                prompt.prompt, options, add_special_tokens=prompt.add_special_tokens, adapter=adapter, images=decoded
            )


def _check_request(request: GenerationRequest) -> None:
    """Rules of any API, checked before anything is read or loaded."""
    if not request.prompts:
        raise InvalidRequestError("the request holds no prompt", param="prompt")
    if len(request.prompts) * request.n > MAX_CHOICES:
        raise InvalidRequestError(
            f"{len(request.prompts)} prompt(s) x n={request.n} asks for more than the {MAX_CHOICES} "
            "completions one request may have",
            param="n",
        )
    if request.n > 1 and request.sampling.temperature < GREEDY_BELOW:
        raise InvalidRequestError(f"n must be 1 when using greedy sampling (temperature 0), got {request.n}", param="n")
    if request.sampling.max_tokens == 0 and not request.echo:
        raise InvalidRequestError(
            "max_tokens 0 asks for no completion; it is allowed only with echo", param="max_tokens"
        )
    if _image_inputs(request) and len(request.prompts) > 1:
        raise InvalidRequestError("images go with one prompt, not a list of prompts", param="prompt")


def _image_inputs(request: GenerationRequest) -> list[ImageInput]:
    found = list(request.images)
    for prompt in request.prompts:
        if isinstance(prompt, ChatPrompt):
            for message in prompt.messages:
                if not isinstance(message.content, str):
                    found += [ImageInput(p.url, p.param) for p in message.content if isinstance(p, ImagePart)]
    return found


async def _echo_text(prompt: Prompt, engine: Engine) -> str:
    """The prompt as echoed: its text as sent, or token IDs decoded, as vLLM echoes them."""
    if isinstance(prompt, TokenPrompt):
        return await engine.decode(prompt.token_ids)
    if isinstance(prompt, TextPrompt):
        return prompt.text
    raise InvalidRequestError("echo is not available for a conversation", param="echo")


def _with_seed(request: PreparedRequest, sample: int) -> PreparedRequest:
    """Choice ``sample`` of a prompt samples with ``seed + sample`` (vLLM's parallel sampling),
    wrapped to stay a signed 64-bit integer."""
    seed = request.sampling.seed
    if sample == 0 or seed is None:
        return request
    shifted = seed + sample
    if shifted > _SEED_MAX:
        shifted -= _SEED_SPAN
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=shifted))
