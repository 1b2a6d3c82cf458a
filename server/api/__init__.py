"""The HTTP layer: wire schemas, routes, errors and auth."""

from server.api.app import create_app

__all__ = ["create_app"]
