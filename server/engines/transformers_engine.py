"""A model served by Hugging Face transformers, for what vLLM does not run.

vLLM dropped encoder-decoder models, and flan-t5-xxl is one (T5). A registry entry
with ``engine: transformers`` is served here instead, with the contract behaviour of
the vLLM engine: the same context-length errors, stop sequences cut out of the text
in both modes, exact token counts, abort on disconnect, and concurrent requests
decoded together in one batch (``_batch_worker``) rather than one after another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from server.engines._batch_worker import BatchWorker, Job
from server.engines._detokenizer import IncrementalDetokenizer
from server.engines._seq2seq_batch import RELATIVE_POSITION_MODELS
from server.engines.base import (
    AdapterRef,
    Engine,
    EngineStats,
    GenerationDelta,
    LaunchOptions,
    PreparedRequest,
    SamplingOptions,
)
from server.engines.rules import fit_to_context, render_chat
from server.errors import InvalidRequestError, ServingError
from server.registry import ModelEntry

logger = logging.getLogger(__name__)

# The sequences one step decodes at most: bounds the memory a burst of requests takes.
# An entry can change it with engine_args: {max_batch_size: N}.
DEFAULT_MAX_BATCH_SIZE = 32
ENGINE_ARGS = frozenset({"max_batch_size"})
# Context length when neither the entry nor the checkpoint gives one: T5 was trained on
# 512-token inputs.
FALLBACK_CONTEXT = 512


class TransformersEngine(Engine):
    def __init__(self, model_id: str, tokenizer: Any, worker: BatchWorker, max_model_len: int):
        self.model_id = model_id
        self.max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._worker = worker
        self._jobs: dict[str, Job] = {}

    @classmethod
    async def start(
        cls,
        model_id: str,
        entry: ModelEntry,
        weights: str,
        adapters: Sequence[AdapterRef] = (),
        launch: LaunchOptions = LaunchOptions(),
    ) -> TransformersEngine:
        """Load off the event loop: reading weights blocks for seconds to minutes."""
        if adapters:
            raise ValueError(
                f"LoRA adapters ({', '.join(a.name for a in adapters)}) are registered on "
                f"'{model_id}', but the transformers engine does not serve adapters"
            )
        return await asyncio.to_thread(cls._load, model_id, entry, weights, _device(launch))

    @classmethod
    def _load(cls, model_id: str, entry: ModelEntry, weights: str, device: str) -> TransformersEngine:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        unknown = sorted(set(entry.engine_args) - ENGINE_ARGS)
        if unknown:
            raise ValueError(
                f"engine_args {', '.join(unknown)} are not understood by the transformers engine "
                f"(it takes {', '.join(sorted(ENGINE_ARGS))})"
            )
        hub = {"revision": entry.revision, "trust_remote_code": entry.trust_remote_code}
        config = AutoConfig.from_pretrained(weights, **hub)
        if config.model_type not in RELATIVE_POSITION_MODELS:
            raise ValueError(
                f"the transformers engine serves T5-family encoder-decoder models "
                f"({', '.join(sorted(RELATIVE_POSITION_MODELS))}), not '{config.model_type}'; "
                "register this model with engine: vllm"
            )
        dtype = _torch_dtype(entry.dtype, on_gpu=device != "cpu")
        model = AutoModelForSeq2SeqLM.from_pretrained(weights, dtype=dtype, **hub).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            entry.tokenizer or weights,
            revision=None if entry.tokenizer else entry.revision,
            trust_remote_code=entry.trust_remote_code,
        )
        worker = BatchWorker(
            model,
            name=model_id,
            max_batch_size=int(entry.engine_args.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            eos_token_ids=_eos_token_ids(model),
        )
        max_model_len = entry.max_model_len or _context_length(config, tokenizer)
        logger.info(
            "model %s on %s (%s), context %d tokens", model_id, model.device, model.dtype, max_model_len
        )
        return cls(model_id, tokenizer, worker, max_model_len)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return render_chat(self._tokenizer, self.model_id, messages)

    async def prepare(
        self,
        prompt: str,
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
    ) -> PreparedRequest:
        if adapter is not None:
            raise InvalidRequestError(
                f"model '{self.model_id}' is served by the transformers engine, which does not "
                "serve LoRA adapters",
                param="model",
            )
        encoded = await asyncio.to_thread(self._tokenizer, prompt, add_special_tokens=add_special_tokens)
        prompt_ids: list[int] = encoded["input_ids"]
        if not prompt_ids:
            raise InvalidRequestError(
                "the prompt is empty: the model needs at least one input token", param="prompt"
            )
        return PreparedRequest(
            prompt_tokens=len(prompt_ids),
            sampling=fit_to_context(self.model_id, self.max_model_len, len(prompt_ids), sampling),
            engine_input=prompt_ids,
        )

    async def generate(self, request: PreparedRequest, request_id: str) -> AsyncIterator[GenerationDelta]:
        job = Job(
            prompt_ids=request.engine_input,
            sampling=request.sampling,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            loop=asyncio.get_running_loop(),
        )
        self._worker.submit(job)
        self._jobs[request_id] = job
        try:
            while True:
                outcome = await job.outbox.get()
                if isinstance(outcome, ServingError):
                    raise outcome
                yield outcome
                if outcome.finish_reason is not None:
                    return
        finally:
            # Reached early when the caller stops listening (a client went away).
            del self._jobs[request_id]
            self._worker.cancel(job)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            self._worker.cancel(job)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._worker.running, peak_batch_size=self._worker.peak_batch_size)

    @property
    def alive(self) -> bool:
        return self._worker.alive

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._worker.close)


def _device(launch: LaunchOptions) -> str:
    """Where the model runs: a GPU when there is one, the first the pool placed it on.

    ``visible_devices`` is meant for an engine's own processes; this engine runs in the
    server's process, so it picks its device by index instead.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if launch.visible_devices:
        return f"cuda:{launch.visible_devices.split(',')[0]}"
    return "cuda"


def _torch_dtype(dtype: str, on_gpu: bool) -> Any:
    """"auto" means the checkpoint's dtype on a GPU; CPUs get float32, the one dtype every
    CPU kernel supports at full speed."""
    import torch

    if dtype == "auto":
        return "auto" if on_gpu else torch.float32
    return getattr(torch, dtype)


def _eos_token_ids(model: Any) -> set[int]:
    """EOS IDs from the generation config and the model config (either may list several)."""
    ids: set[int] = set()
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or ())
    return ids


def _context_length(config: Any, tokenizer: Any) -> int:
    """T5 configs name no context length; its tokenizer's model_max_length or ``n_positions``
    (set in hub configs) do, else T5's training length."""
    for value in (getattr(config, "n_positions", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return FALLBACK_CONTEXT
