"""A model served by vLLM's ``AsyncLLM``, in its own engine processes.

Each instance owns one ``AsyncLLM`` (EngineCore and worker run in child processes), so
models stay isolated: one engine dying does not take the others down. Tokenization goes
through vLLM's own renderer, the path vLLM's OpenAI server uses, which keeps the HTTP
front-end as cheap per request as ``vllm serve``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from server.engines.base import (
    Engine,
    EngineStats,
    GenerationDelta,
    PreparedRequest,
    SamplingOptions,
)
from server.errors import EngineError, InvalidRequestError, UnavailableError
from server.registry import ModelEntry

logger = logging.getLogger(__name__)

# What a CPU engine gets when its entry names no KV-cache size: vLLM's default (a share
# of the NUMA node's RAM) refuses to start on small machines.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def build_engine_args(model_id: str, entry: ModelEntry, weights: str, *, on_cpu: bool) -> Any:
    """Registry entry -> ``AsyncEngineArgs``; the only place that mapping is written."""
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
        # would unregister each other's metrics.
        "disable_log_stats": True,
    }
    if entry.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = entry.gpu_memory_utilization
    if entry.kv_cache_memory is not None:
        kwargs["kv_cache_memory_bytes"] = int(entry.kv_cache_memory)
    elif on_cpu:
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    kwargs.update(entry.engine_args)
    return AsyncEngineArgs(**kwargs)


def running_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(Engine):
    def __init__(self, model_id: str, llm: Any):
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        self.model_id = model_id
        self._llm = llm
        self._parse_prompt = parse_model_prompt
        self.max_model_len = llm.model_config.max_model_len

    @classmethod
    async def start(cls, model_id: str, entry: ModelEntry, weights: str) -> VLLMEngine:
        """Create the engine off the event loop: construction blocks for seconds."""
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_engine_args(model_id, entry, weights, on_cpu=running_on_cpu())
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        return cls(model_id, llm)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        tokenizer = self._llm.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model '{self.model_id}' is registered with prompt_format: chat, "
                "but its tokenizer has no chat template"
            )
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    async def prepare(
        self, prompt: str, sampling: SamplingOptions, *, add_special_tokens: bool = True
    ) -> PreparedRequest:
        from vllm.exceptions import VLLMValidationError

        renderer = self._llm.renderer
        tok_params = dataclasses.replace(
            renderer.default_cmpl_tok_params, add_special_tokens=add_special_tokens
        )
        try:
            (engine_input,) = await renderer.render_cmpl_async(
                [self._parse_prompt(self._llm.model_config, {"prompt": prompt})], tok_params
            )
        except VLLMValidationError as exc:
            raise InvalidRequestError(str(exc), param="prompt") from exc
        prompt_tokens = len(engine_input["prompt_token_ids"])
        return PreparedRequest(
            prompt_tokens=prompt_tokens,
            sampling=self._fit_to_context(prompt_tokens, sampling),
            engine_input=engine_input,
        )

    def _fit_to_context(self, prompt_tokens: int, sampling: SamplingOptions) -> SamplingOptions:
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens long, but model '{self.model_id}' has a "
                f"context length of {self.max_model_len} tokens, which leaves no room to generate",
                param="prompt",
            )
        if sampling.max_tokens <= room:
            return sampling
        if sampling.strict_max_tokens:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                f"the context length of model '{self.model_id}' ({self.max_model_len} tokens); "
                f"ask for at most {room} tokens",
                param="model_parameters.max_tokens",
            )
        return dataclasses.replace(sampling, max_tokens=room)

    @staticmethod
    def _sampling_params(options: SamplingOptions) -> Any:
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
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: PreparedRequest, request_id: str) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        params = self._sampling_params(request.sampling)
        completion_tokens = 0
        try:
            async for output in self._llm.generate(request.engine_input, params, request_id):
                step = output.outputs[0]
                completion_tokens += len(step.token_ids)
                yield GenerationDelta(
                    text=step.text,
                    prompt_tokens=request.prompt_tokens,
                    completion_tokens=completion_tokens,
                    finish_reason=step.finish_reason if output.finished else None,
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
            logger.exception("generation failed for model %s", self.model_id)
            raise EngineError(f"the engine serving model '{self.model_id}' failed: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._llm.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)
