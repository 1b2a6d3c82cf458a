"""The service layer: API requests -> prompts and sampling -> engine calls."""

from server.service.completions import CompletionService, PendingCompletion
from server.service.generation import ChoiceDelta, ChoiceResult, GenerationResult, PendingGeneration
from server.service.images import ImagePolicy
from server.service.requests import (
    ChatMessage,
    ChatPrompt,
    GenerationRequest,
    ImageInput,
    ImagePart,
    SamplingRequest,
    TextPart,
    TextPrompt,
    TokenPrompt,
)

__all__ = [
    "ChatMessage",
    "ChatPrompt",
    "ChoiceDelta",
    "ChoiceResult",
    "CompletionService",
    "GenerationRequest",
    "GenerationResult",
    "ImageInput",
    "ImagePart",
    "ImagePolicy",
    "PendingCompletion",
    "PendingGeneration",
    "SamplingRequest",
    "TextPart",
    "TextPrompt",
    "TokenPrompt",
]
