"""The HTTP layer: wire schemas, routes, errors and auth."""

from server.api.app import create_app
from server.api.state import state_of

__all__ = ["create_app", "state_of"]
