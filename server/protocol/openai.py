"""Wire types of the OpenAI-compatible ``/v1`` routes: completions, chat completions, models.

Field names, defaults and bounds follow OpenAI's API as vLLM's OpenAI server implements
it (``vllm/entrypoints/openai``), so the ``openai`` SDK, and code written for vLLM's
server, work unchanged. Unknown fields are refused (400 naming them); fields of OpenAI's
API this server does not implement are declared only so that a request setting them is
told so by name (``unsupported_fields``), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.protocol.v4 import MAX_ENGINE_INT, Text, encodable

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# OpenAI's limits: completions per prompt (``n``), alternatives per token in chat.
MAX_N = 128
MAX_TOP_LOGPROBS = 20
# vLLM's default limit on prompts in one completions request (VLLM_MAX_COMPLETION_PROMPTS).
MAX_PROMPTS = 1024
MAX_LOGIT_BIAS = 1024
MAX_STOP = 64
PROMPT_SHAPES = "a string, a list of strings, a list of token IDs or a list of token-ID lists"


TokenId = Annotated[int, Field(ge=0, le=MAX_ENGINE_INT)]


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_ENGINE_INT


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    # vLLM's extension: usage on every chunk too.
    continuous_usage_stats: bool | None = False


class _Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    # Fields of OpenAI's API that this server does not implement, with the values that mean
    # "not used" (null is always accepted).
    # vLLM's extensions that this server does not implement, with their neutral values:
    # vLLM's own benchmark client (`vllm bench serve`) always sends repetition_penalty 1.0.
    UNSUPPORTED_EXTENSIONS: ClassVar[dict[str, tuple[Any, ...]]] = {"repetition_penalty": (1.0,)}
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: Text = Field(min_length=1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS
    )
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # vLLM's extension: -1 and 0 are off.
    top_k: int | None = Field(default=None, ge=-1, le=MAX_ENGINE_INT)
    # Accepted and not used, as by vLLM: it identifies the end user to OpenAI's abuse checks.
    user: Text | None = None
    # vLLM's extensions: generate past the end-of-sequence token (benchmarks ask for exact
    # output lengths this way), and the repetition penalty (only its neutral value).
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_ENGINE_INT)

    @field_validator("n", "stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise ValueError(f"keys must be token IDs (non-negative integers as strings), not {key!r}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        """One clear error for stop sequences of the wrong shape."""
        if value is None:
            return value
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        for item in items:
            if not item:
                raise ValueError("stop sequences must not be empty strings")
            encodable(item)
        return value

    def unsupported_fields(self) -> list[str]:
        """The request's fields this server does not implement, set to something that
        would matter."""
        return [
            name
            for name, harmless in (self.UNSUPPORTED_EXTENSIONS | self.UNSUPPORTED).items()
            if (value := getattr(self, name)) is not None and value not in harmless
        ]

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())


class TextCompletionRequest(_Request):
    """``POST /v1/completions``."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"suffix": ("",), "best_of": (1,)}

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    # Log-probabilities of each token and of this many likeliest alternatives (vLLM's limit: 20).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_ENGINE_INT)
    # OpenAI's default; 0 only with echo (the prompt's log-probabilities, nothing generated).
    max_tokens: int = Field(default=16, ge=0, le=MAX_ENGINE_INT)
    suffix: Any = None
    best_of: Any = None

    @field_validator("echo", "max_tokens", mode="before")
    @classmethod
    def _null_is_default_too(cls, value: Any, info: Any) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One clear error for a prompt of the wrong shape, rather than one per shape tried."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be empty")
            return encodable(value)
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {PROMPT_SHAPES}, and not empty")
        if len(value) > MAX_PROMPTS and not all(_is_token_id(item) for item in value):
            raise ValueError(f"holds {len(value)} prompts; at most {MAX_PROMPTS} go in one request")
        if all(isinstance(item, str) for item in value):
            for index, item in enumerate(value):
                if not item:
                    raise ValueError(f"prompt {index} is empty")
                try:
                    encodable(item)
                except ValueError as exc:
                    raise ValueError(f"prompt {index} {exc}") from None
            return value
        if all(_is_token_id(item) for item in value):
            return value
        if all(isinstance(item, list) for item in value):
            for index, item in enumerate(value):
                if not item or not all(_is_token_id(token) for token in item):
                    raise ValueError(f"prompt {index} must be a non-empty list of token IDs (integers from 0)")
            return value
        raise ValueError(f"must be {PROMPT_SHAPES}; token IDs are integers from 0")


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Text = Field(min_length=1)
    # Accepted and not used, as by vLLM: the model's processor decides the resolution.
    detail: Literal["auto", "low", "high"] | None = None


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        # vLLM also takes the URL as a bare string.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class SystemMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer"]
    content: Text | list[TextContent]
    name: Text | None = None


class UserMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user"]
    content: Text | list[ContentPart]
    name: Text | None = None


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"]
    content: Text | list[TextContent] | None = None
    name: Text | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "tools": ([],),
        "tool_choice": ("none",),
        "functions": ([],),
        "function_call": ("none",),
        "response_format": ({"type": "text"},),
        "audio": (),
        "modalities": (["text"],),
        "prediction": (),
        "reasoning_effort": (),
        "metadata": (),
        "store": (False,),
        "service_tier": ("auto", "default"),
        "web_search_options": (),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # max_tokens is OpenAI's older name of max_completion_tokens; either may be sent.
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_ENGINE_INT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_ENGINE_INT)
    # Meaningful only with tools, which are refused; accepted either way.
    parallel_tool_calls: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    web_search_options: Any = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value


# ----- responses -----------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text: its text, its offset, its log-probability (None for
    a prompt's first token) and the likeliest tokens at its position with theirs."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
