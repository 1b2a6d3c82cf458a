"""The service layer: contract requests -> prompts and sampling -> engine calls."""

from server.service.completions import CompletionService, PendingCompletion
from server.service.images import ImagePolicy

__all__ = ["CompletionService", "ImagePolicy", "PendingCompletion"]
