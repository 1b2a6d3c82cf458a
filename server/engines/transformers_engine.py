"""A model served by Hugging Face transformers, for what vLLM does not run.

vLLM dropped encoder-decoder models, and flan-t5-xxl is one (T5); it also dropped
architectures such as MPT (after 0.28). A registry entry with ``engine: transformers``
is served here instead, with the contract behaviour of the vLLM engine: the same
context-length errors, stop sequences cut out of the text in both modes, exact token
counts, abort on disconnect, and concurrent requests decoded together in one batch
(``_batch_worker``) rather than one after another.

Two kinds of model are served, each batched its own way: T5-family encoder-decoders
(``_seq2seq_batch``) and decoder-only causal LMs (``_causal_batch``), each limited to
the model types whose batched output is known to equal their output alone. Anything
else is refused at load, and by ``v4serve check`` (``server.registry.engine_kinds``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from server.engines._batch_worker import Batch, BatchWorker, Job, StepListener
from server.engines._causal_batch import CausalBatch
from server.engines._detokenizer import IncrementalDetokenizer
from server.engines._seq2seq_batch import Seq2SeqBatch
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
from server.registry.engine_kinds import model_type_refusal
from server.telemetry import EngineMetrics

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The sequences one step decodes at most: bounds the memory a burst of requests takes.
# An entry can change it with engine_args: {max_batch_size: N}.
DEFAULT_MAX_BATCH_SIZE = 32
ENGINE_ARGS = frozenset({"max_batch_size"})
# Context length when neither the entry nor the checkpoint gives one: T5 was trained on
# 512-token inputs.
FALLBACK_CONTEXT = 512
# Config keys that give a checkpoint's context length, by the names model types use.
CONTEXT_KEYS = ("n_positions", "max_seq_len", "max_position_embeddings")


class TransformersEngine(Engine):
    def __init__(
        self, model_id: str, tokenizer: Any, worker: BatchWorker, max_model_len: int, vocab_size: int | None = None
    ):
        self.model_id = model_id
        self.max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._worker = worker
        self._jobs: dict[str, Job] = {}
        # Rows of the model's logits: token IDs beyond are refused rather than failing the model call.
        self._vocab_size = vocab_size or len(tokenizer)

    @classmethod
    async def start(
        cls,
        model_id: str,
        entry: ModelEntry,
        weights: str,
        adapters: Sequence[AdapterRef] = (),
        launch: LaunchOptions = LaunchOptions(),
        *,
        metrics: EngineMetrics | None = None,
    ) -> TransformersEngine:
        """Load off the event loop: reading weights blocks for seconds to minutes.

        ``metrics`` receive each step's batch size and the requests waiting for a row.
        """
        if adapters:
            raise ValueError(
                f"LoRA adapters ({', '.join(a.name for a in adapters)}) are registered on "
                f"'{model_id}', but the transformers engine does not serve adapters"
            )
        return await asyncio.to_thread(cls._load, model_id, entry, weights, _device(launch), metrics)

    @classmethod
    def _load(
        cls, model_id: str, entry: ModelEntry, weights: str, device: str, metrics: EngineMetrics | None
    ) -> TransformersEngine:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        unknown = sorted(set(entry.engine_args) - ENGINE_ARGS)
        if unknown:
            raise ValueError(
                f"engine_args {', '.join(unknown)} are not understood by the transformers engine "
                f"(it takes {', '.join(sorted(ENGINE_ARGS))})"
            )
        hub = {"revision": entry.revision, "trust_remote_code": entry.trust_remote_code}
        config = AutoConfig.from_pretrained(weights, **hub)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        refusal = model_type_refusal(config.model_type, encoder_decoder)
        if refusal:
            raise ValueError(f"{refusal}; register this model with engine: vllm")
        if not encoder_decoder:
            _check_positions(entry, config)
        auto_class, batch_class = (
            (AutoModelForSeq2SeqLM, Seq2SeqBatch) if encoder_decoder else (AutoModelForCausalLM, CausalBatch)
        )
        dtype = _torch_dtype(entry.dtype, on_gpu=device != "cpu")
        model = auto_class.from_pretrained(weights, dtype=dtype, **hub).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(
            entry.tokenizer or weights,
            revision=None if entry.tokenizer else entry.revision,
            trust_remote_code=entry.trust_remote_code,
        )
        pad_token_id = _pad_token_id(model, tokenizer)

        def prefill(prompts: list[list[int]], *, decoded: list[list[int]]) -> tuple[Batch, torch.Tensor]:
            return batch_class.prefill(model, prompts, pad_token_id, decoded)

        worker = BatchWorker(
            prefill,
            name=model_id,
            max_batch_size=int(entry.engine_args.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            eos_token_ids=_eos_token_ids(model, tokenizer),
            on_step=None if metrics is None else _step_reporter(metrics),
        )
        max_model_len = entry.max_model_len or _context_length(config, tokenizer)
        logger.info("model %s on %s (%s), context %d tokens", model_id, model.device, model.dtype, max_model_len)
        head = model.get_output_embeddings()
        vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        return cls(model_id, tokenizer, worker, max_model_len, vocab_size)

    async def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        return render_chat(self._tokenizer, self.model_id, messages)

    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    async def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(token_ids))
        return text

    async def prepare(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingOptions,
        *,
        add_special_tokens: bool = True,
        adapter: str | None = None,
        images: Sequence[Any] = (),
    ) -> PreparedRequest:
        if adapter is not None:
            raise InvalidRequestError(
                f"model '{self.model_id}' is served by the transformers engine, which does not serve LoRA adapters",
                param="model",
            )
        if images:
            raise InvalidRequestError(
                f"model '{self.model_id}' is served by the transformers engine, which does not serve vision models",
                param="images",
            )
        if sampling.wants_logprobs:
            raise InvalidRequestError(
                f"model '{self.model_id}' is served by the transformers engine, which does not compute "
                "log-probabilities; models served by vLLM (registry engine: vllm) do",
                param="logprobs",
            )
        self._check_token_ids([token for token, _ in sampling.logit_bias], "logit_bias")
        if isinstance(prompt, str):
            encoded = await asyncio.to_thread(self._tokenizer, prompt, add_special_tokens=add_special_tokens)
            prompt_ids: list[int] = encoded["input_ids"]
        else:
            prompt_ids = list(prompt)
            self._check_token_ids(prompt_ids, "prompt")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: the model needs at least one input token", param="prompt")
        return PreparedRequest(
            prompt_tokens=len(prompt_ids),
            sampling=fit_to_context(self.model_id, self.max_model_len, len(prompt_ids), sampling),
            engine_input=prompt_ids,
            prompt_token_ids=prompt_ids,
        )

    def _check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        outside = sorted({token for token in token_ids if not 0 <= token < self._vocab_size})
        if outside:
            raise InvalidRequestError(
                f"token IDs outside the vocabulary of model '{self.model_id}' (0 to {self._vocab_size - 1}): "
                f"{', '.join(map(str, outside[:5]))}",
                param=param,
            )

    async def generate(
        self, request: PreparedRequest, request_id: str, *, stream: bool = True
    ) -> AsyncGenerator[GenerationDelta, None]:
        # One delta per step either way: the worker produces them anyway, and a
        # non-streaming caller joins them.
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


def _step_reporter(metrics: EngineMetrics) -> StepListener:
    def report(running: int, waiting: int) -> None:
        metrics.scheduler_step(running=running, waiting=waiting)

    return report


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
    """ "auto" means the checkpoint's dtype on a GPU; CPUs get float32, the one dtype every
    CPU kernel supports at full speed."""
    import torch

    if dtype == "auto":
        return "auto" if on_gpu else torch.float32
    return getattr(torch, dtype)


def _check_positions(entry: ModelEntry, config: Any) -> None:
    """A decoder-only model has positions (or an ALiBi table) for so many tokens and no
    more; T5's relative positions have no end."""
    limit = _config_context(config)
    if entry.max_model_len and limit and entry.max_model_len > limit:
        raise ValueError(
            f"max_model_len {entry.max_model_len} is longer than the {limit} positions "
            f"the '{config.model_type}' checkpoint has; set max_model_len to {limit} at most"
        )


def _pad_token_id(model: Any, tokenizer: Any) -> int:
    """What fills padding: any ID does, as padding is masked, but not every model names one
    (MPT's and GPT-2's tokenizers have none)."""
    for value in (model.config.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS IDs from the generation config, the model config (either may list several) and
    the tokenizer, as vLLM takes them."""
    ids: set[int] = set()
    for source in (model.generation_config, model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or ())
    return ids


def _config_context(config: Any) -> int | None:
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return None


def _context_length(config: Any, tokenizer: Any) -> int:
    """The checkpoint's context length (T5 configs name none; ``n_positions`` is set in hub
    configs), else its tokenizer's model_max_length, else T5's training length."""
    value = _config_context(config) or getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else FALLBACK_CONTEXT
