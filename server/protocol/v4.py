"""Wire types of the hosted ``POST /v4/*`` contract.

This module is the one place the contract is written down in code. The HTTP layer
validates request bodies with it and the service layer shapes responses with it, the
same split vLLM uses between ``protocol.py`` and ``serving.py``. Field names, defaults
and bounds follow the public ``scale-gp`` SDK types, so a body that SDK sends is
accepted exactly as the hosted API accepts it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
DEFAULT_TEMPERATURE = 0.2
# The largest integer an engine takes for a count: vLLM serialises sampling parameters
# with msgpack and C ints, and a larger value fails inside the engine instead of here.
MAX_ENGINE_INT = 2**31 - 1


def _encodable(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800") that no tokenizer or engine can encode;
    # refusing them here gives a 422 naming the field instead of an engine failure.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text (unpaired surrogate at position {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class Image(BaseModel):
    """One image for a vision model: an http(s) URL or a ``data:`` URI."""

    model_config = ConfigDict(extra="ignore")

    image_url: Text = Field(min_length=1)
    detail: Text = "auto"


class ModelParameters(BaseModel):
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


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail
