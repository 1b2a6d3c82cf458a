"""OpenAI-compatible routes (``/v1``) on the same registry, pool, auth, limits and logging
as the hosted contract's ``/v4`` routes."""

from server.api.openai.routes import router

__all__ = ["router"]
