"""The service layer: contract requests -> prompts and sampling -> engine calls."""

from server.service.completions import CompletionService, PendingCompletion

__all__ = ["CompletionService", "PendingCompletion"]
