"""OpenAI-compatible routes (``/v1``) on the same registry, pool, auth, limits and logging
as the hosted contract's ``/v4`` routes."""

from server.api.openai import batches, files
from server.api.openai.routes import router

# The Files and Batch APIs (server.batch) share the OpenAI routes' error shape and auth.
router.include_router(files.router)
router.include_router(batches.router)

__all__ = ["router"]
