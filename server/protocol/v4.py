"""Wire types of the hosted ``POST /v4/*`` contract.

This module is the one place the contract is written down in code. The HTTP layer
validates request bodies with it and the service layer shapes responses with it, the
same split vLLM uses between ``protocol.py`` and ``serving.py``. Field names, defaults
and bounds follow the public ``scale-gp`` SDK types, so a body that SDK sends is
accepted exactly as the hosted API accepts it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
DEFAULT_TEMPERATURE = 0.2
# The largest integer an engine takes for a count: vLLM serialises sampling parameters
# with msgpack and C ints, and a larger value fails inside the engine instead of here.
MAX_ENGINE_INT = 2**31 - 1


def encodable(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800") that no tokenizer or engine can encode;
    # refusing them here gives a 422 naming the field instead of an engine failure.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text (unpaired surrogate at position {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]


class RequestModel(BaseModel):
    """A request body type: fields it does not know are ignored, as the hosted API ignores
    them, and their names are kept so the server can log them (``ignored_fields``), as
    vLLM's ``OpenAIBaseModel`` does: a misspelt parameter is otherwise silently dropped.
    """

    model_config = ConfigDict(extra="ignore")

    _ignored: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_ignored_names(cls, data: Any, handler: ModelWrapValidatorHandler[RequestModel]) -> RequestModel:
        model = handler(data)
        if isinstance(data, dict):
            accepted = _accepted_keys(cls)
            ignored = tuple(str(key) for key in data if key not in accepted)
            if ignored:
                model._ignored = ignored
        return model

    def ignored_fields(self) -> list[str]:
        """The names of the fields the body held and the server ignored: this model's
        first, then its nested models' by path (``model_parameters.seed``, ``images[0].alt``).

        The names are the caller's, unescaped: log them with ``repr``.
        """
        found = list(self._ignored)
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, RequestModel):
                found += [f"{name}.{field}" for field in value.ignored_fields()]
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, RequestModel):
                        found += [f"{name}[{index}].{field}" for field in item.ignored_fields()]
        return found


@functools.cache
def _accepted_keys(model: type[BaseModel]) -> frozenset[str]:
    """The keys ``model`` reads from a body: field names (unless only aliases are accepted)
    and aliases, the first key of an alias path included."""
    by_name = model.model_config.get("populate_by_name") or model.model_config.get("validate_by_name")
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        aliases = info.validation_alias or info.alias
        if aliases is None or by_name:
            keys.add(name)
        choices = aliases.choices if isinstance(aliases, AliasChoices) else [aliases]
        for choice in choices:
            if isinstance(choice, str):
                keys.add(choice)
            elif isinstance(choice, AliasPath):
                keys.add(str(choice.path[0]))
    return frozenset(keys)


class Image(RequestModel):
    """One image for a vision model: an http(s) URL or a ``data:`` URI."""

    image_url: Text = Field(min_length=1)
    detail: Text = "auto"


class ModelParameters(RequestModel):
    """Sampling parameters; every field is optional, as in the hosted API."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_ENGINE_INT)
    stop_sequences: list[Text] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_ENGINE_INT, validation_alias=AliasChoices("top_k", "topK"))
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, validation_alias=AliasChoices("top_p", "topP"))
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        # An empty stop string would end every completion before its first token.
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value


class CompletionRequest(RequestModel):
    model: Text = Field(min_length=1)
    prompt: Text
    account_id: Text | None = None
    images: list[Image] | None = None
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)
    stream: bool = False

    @field_validator("model_parameters", mode="before")
    @classmethod
    def _null_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value


class Completion(BaseModel):
    text: str
    finish_reason: str | None = None
    response_metadata: dict[str, Any] | None = None


class TokenUsage(BaseModel):
    prompt: int
    completion: int
    total: int


class CompletionResponse(BaseModel):
    completion: Completion
    token_usage: TokenUsage | None = None

    # As a stream chunk (server.api.streaming.StreamChunk).
    def delta_text(self) -> str:
        return self.completion.text

    def is_last(self) -> bool:
        return self.completion.finish_reason is not None

    def with_text(self, text: str) -> CompletionResponse:
        completion = Completion.model_construct(
            text=text, finish_reason=self.completion.finish_reason, response_metadata=self.completion.response_metadata
        )
        return CompletionResponse.model_construct(completion=completion, token_usage=self.token_usage)


# ----- POST /v4/chat-completions ---------------------------------------------------------

# The longest chat_template a request may carry, in characters (the llama and mixtral
# templates are under 2,000).
MAX_CHAT_TEMPLATE_CHARS = 65_536
CHAT_ROLES = ("user", "assistant", "system")


class ChatText(RequestModel):
    type: Literal["text"] = "text"
    text: Text


class ChatImageURL(RequestModel):
    url: Text = Field(min_length=1)
    # Accepted and not used (the hosted API passes it to OpenAI models only).
    detail: Literal["low", "high", "auto"] | None = None


class ChatImageURLPart(RequestModel):
    type: Literal["image_url"] = "image_url"
    image_url: ChatImageURL


class ChatImageData(RequestModel):
    """An image inline: base64 data and its media type (``image/png``)."""

    data: Text = Field(min_length=1)
    media_type: Text = Field(pattern=r"^image/[A-Za-z0-9.+-]+$", max_length=100)
    detail: Literal["low", "high", "auto"] | None = None
    type: Literal["base64"] = "base64"

    def data_url(self) -> str:
        return f"data:{self.media_type};base64,{self.data}"


class ChatImageDataPart(RequestModel):
    type: Literal["image_data"] = "image_data"
    image_data: ChatImageData


def _part_kind(value: Any) -> str | None:
    """A content part's kind: its ``type``, which the SDK lets a caller leave out, else the
    key it carries."""
    if isinstance(value, dict):
        if "type" in value:
            kind = value["type"]
            return kind if isinstance(kind, str) else None
        return next((key for key in ("text", "image_url", "image_data") if key in value), None)
    return getattr(value, "type", None)


ChatContentPart = Annotated[
    Annotated[ChatText, Tag("text")]
    | Annotated[ChatImageURLPart, Tag("image_url")]
    | Annotated[ChatImageDataPart, Tag("image_data")],
    Discriminator(
        _part_kind,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part is text ({'text'}), an image URL ({'image_url': {'url'}}) or "
        "inline image data ({'image_data': {'data', 'media_type'}})",
    ),
]


class ChatUserMessage(RequestModel):
    role: Literal["user"] = "user"
    content: Text | list[ChatContentPart]


class ChatAssistantMessage(RequestModel):
    role: Literal["assistant"] = "assistant"
    content: Text


class ChatSystemMessage(RequestModel):
    role: Literal["system"] = "system"
    content: Text


def _role(value: Any) -> str | None:
    """A message's role; the SDK lets a caller leave it out, which makes a user message."""
    if isinstance(value, dict):
        role = value.get("role", "user")
        return role if isinstance(role, str) else None
    return getattr(value, "role", None)


ChatMessage = Annotated[
    Annotated[ChatUserMessage, Tag("user")]
    | Annotated[ChatAssistantMessage, Tag("assistant")]
    | Annotated[ChatSystemMessage, Tag("system")],
    Discriminator(
        _role,
        custom_error_type="invalid_role",
        custom_error_message="role must be one of: user, assistant, system",
    ),
]


class LastKParams(RequestModel):
    k: int = Field(ge=1, le=MAX_ENGINE_INT)


class MemoryStrategy(RequestModel):
    """Keep the conversation's last ``params.k`` messages (the only strategy the hosted API has)."""

    name: Literal["last_k"] = "last_k"
    params: LastKParams


class ChatCompletionRequest(RequestModel):
    model: Text = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    account_id: Text | None = None
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)
    stream: bool = False
    # A system prompt, put before the messages.
    instructions: Text | None = None
    # A Jinja template for this request, in place of the model's own: given `messages`
    # (role and content), `bos_token`, `eos_token` and `add_generation_prompt`.
    chat_template: Text | None = Field(default=None, min_length=1, max_length=MAX_CHAT_TEMPLATE_CHARS)
    memory_strategy: MemoryStrategy | None = None

    @field_validator("model_parameters", mode="before")
    @classmethod
    def _null_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletion(BaseModel):
    message: ChatCompletionMessage
    finish_reason: str | None = None


class ChatCompletionsResponse(BaseModel):
    chat_completion: ChatCompletion
    token_usage: TokenUsage | None = None

    # As a stream chunk (server.api.streaming.StreamChunk).
    def delta_text(self) -> str:
        return self.chat_completion.message.content

    def is_last(self) -> bool:
        return self.chat_completion.finish_reason is not None

    def with_text(self, text: str) -> ChatCompletionsResponse:
        return chat_completions_response(text, self.chat_completion.finish_reason, self.token_usage)


def chat_completions_response(
    text: str, finish_reason: str | None, token_usage: TokenUsage | None
) -> ChatCompletionsResponse:
    """Built without validation (once per streamed token): the values are the server's own."""
    message = ChatCompletionMessage.model_construct(role="assistant", content=text)
    completion = ChatCompletion.model_construct(message=message, finish_reason=finish_reason)
    return ChatCompletionsResponse.model_construct(chat_completion=completion, token_usage=token_usage)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int
    # The request's ID (``x-request-id``), to quote to the operator; absent outside a request.
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----- the server's own endpoints: the model list and the probes -------------------------


class ModelInfo(BaseModel):
    """One registered model in ``GET /v4/models``, and the state of the engine serving it."""

    id: str
    aliases: list[str]
    source: str | None = Field(
        description="hub repo ID or builtin:NAME as the registry writes it; a local directory as local:NAME"
    )
    base: str | None = Field(description="for a LoRA adapter, the model whose engine serves it")
    adapter: str | None = Field(description="for a LoRA adapter, its weights, shown as source is")
    engine: str
    state: str = Field(description="not_loaded, loading, ready, sleeping or failed")
    running_requests: int
    queued_requests: int
    pinned: bool
    memory_bytes: int | None = Field(description="memory reserved for the engine, while it holds any")
    devices: str | None = Field(description="the GPUs the engine runs on (CUDA_VISIBLE_DEVICES); null on the host")
    idle_seconds: float | None = Field(description="seconds since the last request, while loaded and idle")
    load_seconds: float | None = Field(description="how long the last load or wake took")
    error: str | None = Field(description="why the model or its engine failed, when it did")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """``/readyz``: 200 once the pinned and preloaded models are ready, else 503 ``loading``."""

    status: Literal["ready", "loading"]
    preload: list[str]
