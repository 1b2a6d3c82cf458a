"""A model served by vLLM's ``AsyncLLM``, in its own engine processes.

Each instance owns one ``AsyncLLM`` (EngineCore and worker run in child processes), so
models stay isolated: one engine dying does not take the others down. Tokenization goes
through vLLM's own renderer, the path vLLM's OpenAI server uses, which keeps the HTTP
front-end as cheap per request as ``vllm serve``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import typing
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from server.engines.base import (
    AdapterRef,
    Engine,
    EngineStats,
    GenerationDelta,
    LaunchOptions,
    PreparedRequest,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)
from server.engines.rules import fit_to_context, render_chat
from server.errors import EngineError, InvalidRequestError, UnavailableError
from server.registry import ModelEntry
from server.registry.engine_kinds import DEFAULT_CPU_KV_CACHE_BYTES
from server.telemetry import EngineMetrics, trace_headers

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)

# vLLM reserves buffers for this many adapters in one batch; with more adapters on one
# base, the others wait for a free slot.
MAX_LORAS_PER_BATCH = 8

# Seconds a CPU engine's processes get to exit before vLLM kills them. Measured here, the
# CPU worker never exits within vLLM's default 5 s and is killed anyway, so waiting the
# full 5 s only lengthens every model swap. GPU engines keep vLLM's default.
CPU_SHUTDOWN_GRACE_SECONDS = 1.0


def build_engine_args(
    model_id: str,
    entry: ModelEntry,
    weights: str,
    *,
    on_cpu: bool,
    adapters: Sequence[AdapterRef],
    launch: LaunchOptions = LaunchOptions(),
    traces_endpoint: str | None = None,
) -> Any:
    """Registry entry -> ``AsyncEngineArgs``; the only place that mapping is written.

    ``traces_endpoint``: vLLM's own OpenTelemetry spans go there (its ``otlp_traces_endpoint``).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": weights,
        "served_model_name": [model_id],
        "tokenizer": entry.tokenizer,
        "revision": entry.revision,
        "dtype": entry.dtype,
        "max_model_len": entry.max_model_len,
        "tensor_parallel_size": entry.tensor_parallel_size,
        "trust_remote_code": entry.trust_remote_code,
        # One Prometheus registry per process: vLLM's stat loggers of several engines
        # would unregister each other's metrics. Its statistics reach the server's own
        # metrics through a stat logger of ours instead (``stat_logger_factory``).
        "disable_log_stats": True,
    }
    if traces_endpoint is not None:
        kwargs["otlp_traces_endpoint"] = traces_endpoint
    if entry.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = entry.gpu_memory_utilization
    if entry.kv_cache_memory is not None:
        kwargs["kv_cache_memory_bytes"] = int(entry.kv_cache_memory)
    elif on_cpu:
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    elif entry.gpu_memory_utilization is None and launch.memory_share is not None:
        # The pool's share of the device: shares of engines on one GPU add up to its budget.
        kwargs["gpu_memory_utilization"] = launch.memory_share
    if launch.enable_sleep and not on_cpu:
        kwargs["enable_sleep_mode"] = True
    if entry.vision is not None:
        kwargs["limit_mm_per_prompt"] = {"image": entry.vision.max_images}
    kwargs.update(lora_engine_args(adapters))
    kwargs.update(entry.engine_args)
    return AsyncEngineArgs(**kwargs)


def lora_engine_args(adapters: Sequence[AdapterRef]) -> dict[str, Any]:
    """LoRA settings for a base engine serving ``adapters``; none leaves LoRA off.

    The base entry's ``engine_args`` override these settings.
    """
    if not adapters:
        return {}
    from vllm.config.lora import MaxLoRARanks

    rank = max(a.rank for a in adapters)
    # vLLM sizes its buffers for one of a few ranks; a smaller adapter fits a larger one.
    buffer_rank = min((r for r in typing.get_args(MaxLoRARanks) if r >= rank), default=rank)
    return {
        "enable_lora": True,
        "max_loras": min(len(adapters), MAX_LORAS_PER_BATCH),
        "max_lora_rank": buffer_rank,
    }


def running_on_cpu() -> bool:
    from vllm.platforms import current_platform

    on_cpu: bool = current_platform.is_cpu()
    return on_cpu


class VLLMEngine(Engine):
    def __init__(
        self,
        model_id: str,
        llm: Any,
        adapters: Sequence[AdapterRef],
        *,
        sleep_enabled: bool = False,
        chat_template: str | None = None,
    ):
        from vllm.lora.request import LoRARequest
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        self.model_id = model_id
        self._llm = llm
        self._parse_prompt = parse_model_prompt
        self.max_model_len = llm.model_config.max_model_len
        self._sleep_enabled = sleep_enabled
        self._chat_template = chat_template
        # Whether vLLM traces too: requests then carry the trace context to it.
        self._traced = False
        # vLLM caches a loaded adapter under its int ID, so each name keeps one ID (until
        # it is taken again with other weights: a new ID then, as the cache holds the old).
        self._loras = {a.name: LoRARequest(a.name, lora_id, a.path) for lora_id, a in enumerate(adapters, start=1)}
        self._lora_request = LoRARequest
        self._last_lora_id = len(adapters)

    @classmethod
    async def start(
        cls,
        model_id: str,
        entry: ModelEntry,
        weights: str,
        adapters: Sequence[AdapterRef],
        launch: LaunchOptions = LaunchOptions(),
        *,
        metrics: EngineMetrics | None = None,
        traces_endpoint: str | None = None,
    ) -> VLLMEngine:
        """Create the engine off the event loop: construction blocks for seconds.

        ``metrics`` receive vLLM's scheduler statistics; ``traces_endpoint`` gets vLLM's
        own spans, joined to each request's trace.
        """
        if traces_endpoint is not None:
            # vLLM exports over gRPC unless told otherwise; the server's collector takes OTLP/HTTP.
            os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")

        def create() -> Any:
            # vLLM is imported here, in the thread, too: its first import takes seconds
            # (7 s on an idle 2-core machine, more under load), during which the event loop
            # would answer nothing, health checks and other models' requests included.
            from vllm.v1.engine.async_llm import AsyncLLM

            args = build_engine_args(
                model_id,
                entry,
                weights,
                on_cpu=running_on_cpu(),
                adapters=adapters,
                launch=launch,
                traces_endpoint=traces_endpoint,
            )
            loggers = [stat_logger_factory(metrics)] if metrics is not None else None
            return _with_visible_devices(
                launch.visible_devices, functools.partial(AsyncLLM.from_engine_args, stat_loggers=loggers), args
            )

        llm = await asyncio.to_thread(create)
        template = await asyncio.to_thread(_vision_chat_template, llm) if entry.vision is not None else None
        engine = cls(
            model_id,
            llm,
            adapters,
            sleep_enabled=launch.enable_sleep and not running_on_cpu(),
            chat_template=template,
        )
        engine._traced = traces_endpoint is not None
        return engine

    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        return render_chat(self._llm.get_tokenizer(), self.model_id, messages, self._chat_template)

    def has_chat_template(self) -> bool:
        return bool(self._chat_template or getattr(self._llm.get_tokenizer(), "chat_template", None))

    async def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self._llm.get_tokenizer().decode(list(token_ids))
        return text

    async def prepare(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
        images: Sequence[PIL.Image.Image] = (),
    ) -> PreparedRequest:
        from vllm.exceptions import VLLMValidationError

        self._check_sampling(sampling)
        renderer = self._llm.renderer
        tok_params = dataclasses.replace(renderer.default_cmpl_tok_params, add_special_tokens=add_special_tokens)
        request: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        if images:
            # vLLM's processor expands each placeholder into that image's feature tokens.
            request["multi_modal_data"] = {"image": list(images)}
        try:
            if not isinstance(prompt, str):
                # vLLM checks token IDs only once the request is in the engine; refused here,
                # a streaming request still gets its status.
                renderer.validate_token_ids(list(prompt), parameter="prompt")
            # skip_mm_cache: by default the renderer remembers each processed image as sent
            # to the engine and later sends only its hash. A request refused after
            # rendering (too long for the context, a client gone) never reaches the
            # engine, and the next request with that image would end with
            # finish_reason "error" and no text. The images' processing is still cached.
            (engine_input,) = await renderer.render_cmpl_async(
                [self._parse_prompt(self._llm.model_config, request)], tok_params, skip_mm_cache=bool(images)
            )
        except VLLMValidationError as exc:
            raise InvalidRequestError(str(exc), param="prompt") from exc
        except (AssertionError, RuntimeError, ValueError) as exc:
            if not images:
                raise
            # How vLLM's multimodal processor says the images did not fit the prompt (a
            # placeholder it could not match, more images than the engine's limit).
            raise InvalidRequestError(
                f"model '{self.model_id}' cannot take these images with this prompt ({exc})", param="images"
            ) from exc
        prompt_token_ids = engine_input["prompt_token_ids"]
        prompt_tokens = len(prompt_token_ids)
        return PreparedRequest(
            prompt_tokens=prompt_tokens,
            sampling=fit_to_context(self.model_id, self.max_model_len, prompt_tokens, sampling),
            engine_input=engine_input,
            adapter=adapter,
            prompt_token_ids=prompt_token_ids,
        )

    def _check_sampling(self, sampling: SamplingOptions) -> None:
        """What vLLM would refuse only once the request is in the engine (after a stream
        began), refused now while the status can still say so."""
        config = self._llm.model_config
        vocabulary: int = config.get_vocab_size()
        most = config.max_logprobs if config.max_logprobs >= 0 else vocabulary
        for name, value in (("logprobs", sampling.logprobs), ("prompt_logprobs", sampling.prompt_logprobs)):
            if value is not None and value > most:
                raise InvalidRequestError(
                    f"model '{self.model_id}' returns at most {most} log-probabilities a token; {value} were asked for",
                    param=name,
                )
        outside = sorted(token for token, _ in sampling.logit_bias if not 0 <= token < vocabulary)
        if outside:
            raise InvalidRequestError(
                f"logit_bias names token IDs outside the vocabulary of model '{self.model_id}' "
                f"(0 to {vocabulary - 1}): {', '.join(map(str, outside[:5]))}",
                param="logit_bias",
            )

    @staticmethod
    def _sampling_params(options: SamplingOptions, *, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            stop=list(options.stop) or None,
            seed=options.seed,
            logprobs=options.logprobs,
            prompt_logprobs=options.prompt_logprobs,
            logit_bias=dict(options.logit_bias) or None,
            ignore_eos=options.ignore_eos,
            # Non-streaming requests get one output at the end, as in vLLM's own server:
            # no per-token detokenized outputs to build and hand across the event loop.
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(
        self, request: PreparedRequest, request_id: str, *, stream: bool = True
    ) -> AsyncGenerator[GenerationDelta, None]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        options = request.sampling
        params = self._sampling_params(options, stream=stream)
        lora = self._loras[request.adapter] if request.adapter is not None else None
        completion_tokens = 0
        prompt_logprobs_sent = options.prompt_logprobs is None
        try:
            # A copy of the input: one prepared request may be generated from more than once.
            async with aclosing(
                self._llm.generate(
                    dict(request.engine_input),
                    params,
                    request_id,
                    lora_request=lora,
                    trace_headers=trace_headers() if self._traced else None,
                )
            ) as outputs:
                async for output in outputs:
                    step = output.outputs[0]
                    completion_tokens += len(step.token_ids)
                    token_ids = tuple(step.token_ids)
                    prompt_logprobs = None
                    if not prompt_logprobs_sent and output.prompt_logprobs:
                        prompt_logprobs = self._logprobs(
                            output.prompt_token_ids, output.prompt_logprobs, options.prompt_logprobs
                        )
                        prompt_logprobs_sent = True
                    yield GenerationDelta(
                        text=step.text,
                        prompt_tokens=request.prompt_tokens,
                        completion_tokens=completion_tokens,
                        finish_reason=step.finish_reason if output.finished else None,
                        token_ids=token_ids,
                        logprobs=(
                            None
                            if options.logprobs is None
                            else self._logprobs(token_ids, step.logprobs or (), options.logprobs)
                        ),
                        prompt_logprobs=prompt_logprobs,
                    )
        except EngineDeadError as exc:
            raise UnavailableError(
                f"the engine serving model '{self.model_id}' stopped unexpectedly", retry_after=5
            ) from exc
        except VLLMClientError as exc:
            raise InvalidRequestError(str(exc)) from exc
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            logger.exception("generation failed for model %s, request %s", self.model_id, request_id)
            # The exception's own text stays in the log: it can name internals.
            raise EngineError(
                f"the engine serving model '{self.model_id}' failed on this request "
                f"({type(exc.__cause__ or exc).__name__}); the server log has the details under {request_id}"
            ) from exc

    def _logprobs(self, token_ids: Sequence[int], positions: Any, top: int | None) -> tuple[TokenLogprob, ...]:
        """vLLM's per-position ``{token ID: Logprob}`` (the chosen token and the ``top``
        likeliest, each with its rank) -> one ``TokenLogprob`` per token. A position
        without any (a prompt's first token) gets its token's text alone."""
        tokenizer = self._llm.get_tokenizer()
        entries = []
        for index, token_id in enumerate(token_ids):
            candidates: dict[int, Any] = (positions[index] if index < len(positions) else None) or {}
            chosen = candidates.get(token_id)
            if chosen is None:
                entries.append(TokenLogprob(token_id, tokenizer.decode([token_id]), None))
                continue
            likeliest = sorted(
                (item for item in candidates.items() if item[1].rank is not None and item[1].rank <= (top or 0)),
                key=lambda item: item[1].rank,
            )
            entries.append(
                TokenLogprob(
                    token_id=token_id,
                    token=_token_text(chosen, token_id, tokenizer),
                    logprob=chosen.logprob,
                    rank=chosen.rank,
                    top=tuple(
                        TopLogprob(other, _token_text(logprob, other, tokenizer), logprob.logprob)
                        for other, logprob in likeliest
                    ),
                )
            )
        return tuple(entries)

    def add_adapter(self, adapter: AdapterRef) -> bool:
        # vLLM loads an adapter on the first request that names it (a LoRARequest carries
        # its path), so taking one at run time needs only LoRA enabled at start-up with
        # buffers for its rank; vLLM's own runtime loading (/v1/load_lora_adapter) does the same.
        lora_config = self._llm.vllm_config.lora_config
        if lora_config is None or adapter.rank > lora_config.max_lora_rank:
            return False
        current = self._loras.get(adapter.name)
        if current is None or current.lora_path != adapter.path:
            self._last_lora_id += 1
            self._loras[adapter.name] = self._lora_request(adapter.name, self._last_lora_id, adapter.path)
        return True

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._llm.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        grace = CPU_SHUTDOWN_GRACE_SECONDS if running_on_cpu() else None
        await asyncio.to_thread(self._llm.shutdown, grace)

    @property
    def alive(self) -> bool:
        return not self._llm.errored

    @property
    def supports_sleep(self) -> bool:
        return self._sleep_enabled

    async def sleep(self) -> None:
        # Level 1: weights go to host memory and the KV cache is dropped, so waking takes
        # seconds instead of a reload (vLLM's sleep mode, CUDA only).
        await self._llm.sleep(level=1)

    async def wake_up(self) -> None:
        await self._llm.wake_up()


def stat_logger_factory(metrics: EngineMetrics) -> Callable[[Any, int], Any]:
    """A vLLM per-engine stat logger factory (``AsyncLLM(stat_loggers=[...])``) writing the
    engine's scheduler statistics into ``metrics``: KV-cache usage, waiting requests,
    the batch size of each step, preemptions. vLLM calls it in this process, from its
    output handler, once per engine step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _ServerStatLogger(StatLoggerBase):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                metrics.scheduler_step(
                    kv_cache_usage=scheduler_stats.kv_cache_usage,
                    running=scheduler_stats.num_running_reqs,
                    waiting=scheduler_stats.num_waiting_reqs,
                )
            if iteration_stats is not None:
                metrics.preempted(iteration_stats.num_preempted_reqs)

        def log_engine_initialized(self) -> None:
            pass

    return _ServerStatLogger


def _token_text(logprob: Any, token_id: int, tokenizer: Any) -> str:
    """The token's text as vLLM's OpenAI server shows it: decoded alone, leading space kept."""
    decoded = logprob.decoded_token
    if decoded is None:
        decoded = tokenizer.decode([token_id])
    return str(decoded)


def _vision_chat_template(llm: Any) -> str | None:
    """The template vLLM's own chat endpoint renders with: a vision model's processor can
    carry a template that its tokenizer lacks."""
    from vllm.renderers.hf import resolve_chat_template

    template: str | None = resolve_chat_template(llm.get_tokenizer(), None, None, model_config=llm.model_config)
    return template


def _with_visible_devices(devices: str | None, create: Any, args: Any) -> Any:
    """Run ``create(args)`` with CUDA_VISIBLE_DEVICES set for the processes it spawns.

    vLLM's engine processes read the variable when they start; the pool starts engines
    one at a time, so setting it around the call cannot leak into another engine.
    """
    if devices is None:
        return create(args)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        return create(args)
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
