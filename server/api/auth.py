"""API keys, checked in ASGI middleware before a route runs or one body byte is read.

Keys come from ``V4SERVE_API_KEYS`` or a keys file, as ``key``, ``key:account`` or
``key:account:admin`` items (``key::admin`` for an admin key without an account). An admin
key may read every account's usage (``GET /v4/usage``) and change the server (the admin
API); other keys see their own usage only. A key that names its account has its usage attributed to that account, whatever the caller
writes in the body or headers; only a key without one (or an open server) lets the caller
choose (``account_id`` in the body, else ``x-selected-account-id``).

The check is middleware, not a route dependency, because FastAPI reads and parses the
whole body (up to the body limit) before it resolves a route's dependencies: a caller
without a key could make the server do that work for nothing. Here a request without a
valid key is answered 401 from its headers alone.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server import telemetry
from server.api.errors import error_response
from server.errors import AuthenticationError

# Liveness and readiness probes carry no key; everything else needs one when keys are set.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Where the middleware leaves the caller in the ASGI scope: ``scope["state"]["caller"]``,
# which routes read as ``request.state.caller``.
CALLER_STATE_KEY = "caller"
ENV_NAME = "V4SERVE_API_KEYS"
ADMIN_ROLE = "admin"
MISSING_KEY = "missing API key: send it in the x-api-key header or as 'Authorization: Bearer <key>'"


class KeyRingError(ValueError):
    """Keys the server refuses to start with; the message names where they came from."""


@dataclass(frozen=True)
class ApiKey:
    secret: bytes
    account: str | None
    # Where the key was configured ("V4SERVE_API_KEYS item 2", "keys.txt line 3"): a name
    # that tells keys apart in logs without revealing any of them.
    name: str
    admin: bool = False


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the middleware established it from the headers."""

    key_name: str | None
    account: str | None
    selected_account: str | None
    # An admin key, or a server without keys (anyone may do anything there).
    admin: bool = False

    def usage_account(self, body_account: str | None) -> str | None:
        """The account usage is logged against.

        The key's own account wins: a caller cannot charge usage to, or hide it behind,
        another account. A key without one (or an open server) may name it in the body,
        which is per request and so wins over the client-wide ``x-selected-account-id``.
        """
        return self.account or body_account or self.selected_account


class KeyRing:
    def __init__(self, keys: Sequence[ApiKey]):
        self._keys = tuple(keys)

    @classmethod
    def from_sources(cls, env_value: str, keys_file: Path | None) -> KeyRing:
        """Every configured key; raises ``KeyRingError`` for a source that would leave the
        server open or with a key no request can present (empty, non-ASCII)."""
        keys: list[ApiKey] = []
        if env_value:
            items = [(f"{ENV_NAME} item {n}", item) for n, item in enumerate(env_value.split(","), 1)]
            found = list(_parse(items))
            if not found:
                raise KeyRingError(f"{ENV_NAME} is set but holds no keys; unset it to serve without authentication")
            keys += found
        if keys_file is not None:
            found = list(_parse(_file_items(keys_file)))
            if not found:
                raise KeyRingError(
                    f"API keys file {keys_file} holds no keys (one 'key' or 'key:account' a line); "
                    "leave out --api-keys-file to serve without authentication"
                )
            keys += found
        return cls(_without_duplicates(keys))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def match(self, presented: bytes | None) -> ApiKey:
        """The key ``presented`` is; raises ``AuthenticationError`` for a missing or unknown one."""
        if presented is None:
            raise AuthenticationError(MISSING_KEY)
        # Compare against every key in constant time so timing reveals nothing.
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.secret, presented):
                found = key
        if found is None:
            raise AuthenticationError("invalid API key")
        return found


def _file_items(path: Path) -> Iterable[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KeyRingError(f"API keys file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("#"):
            yield f"{path} line {number}", line


def _parse(items: Iterable[tuple[str, str]]) -> Iterable[ApiKey]:
    for where, item in items:
        item = item.strip()
        if not item:
            continue
        key, _, rest = item.partition(":")
        account, _, role = rest.partition(":")
        key, role = key.strip(), role.strip()
        if not key:
            raise KeyRingError(f"{where}: empty API key; write 'key', 'key:account' or 'key:account:admin'")
        if role not in ("", ADMIN_ROLE):
            raise KeyRingError(
                f"{where}: unknown key role {role!r}; the only one is '{ADMIN_ROLE}' (key:account:admin)"
            )
        # Header values travel as bytes, which clients encode differently beyond ASCII, and
        # 'Authorization: Bearer' splits on spaces: such a key could never match reliably.
        if not all("!" <= char <= "~" for char in key):
            raise KeyRingError(f"{where}: API keys must be printable ASCII without spaces")
        yield ApiKey(key.encode("ascii"), account.strip() or None, where, admin=role == ADMIN_ROLE)


def _without_duplicates(keys: list[ApiKey]) -> list[ApiKey]:
    """One entry per key; the same key bound to two accounts is refused as ambiguous."""
    unique: dict[bytes, ApiKey] = {}
    for key in keys:
        first = unique.setdefault(key.secret, key)
        if (first.account, first.admin) != (key.account, key.admin):
            raise KeyRingError(f"{key.name}: the same key as {first.name}, with another account or role")
    return list(unique.values())


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key from ``x-api-key``, else from ``Authorization: Bearer`` (OpenAI clients)."""
    api_key = authorization = None
    for name, value in headers:
        if name == b"x-api-key" and api_key is None:
            api_key = value
        elif name == b"authorization" and authorization is None:
            authorization = value
    if api_key is not None:
        return api_key.strip()
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return token.strip()
    return None


def _header(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    # latin-1, as Starlette decodes headers: every byte sequence is a valid string.
    return next((value.decode("latin-1") for name, value in headers if name == wanted), None)


class ApiKeyAuth:
    """ASGI middleware: 401 for a request without a valid key, answered from its headers.

    Every path but ``OPEN_PATHS`` needs a key when keys are configured, the API docs
    included. The caller it establishes goes into ``scope["state"]``, for routes.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, open_paths: Iterable[str] = ()):
        self.app = app
        self.keys = keys
        # Paths the operator opened on top of the probes (``--metrics-open``: /metrics).
        self.open_paths = OPEN_PATHS | frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        try:
            with telemetry.phase("auth"):
                caller = self._identify(headers)
        except AuthenticationError as exc:
            if scope["type"] == "websocket":
                # Closing before accepting refuses the handshake (HTTP 403).
                await send({"type": "websocket.close", "code": 1008})
                return
            # The body is never read: the server answers now and drops whatever follows.
            response = error_response(exc, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[CALLER_STATE_KEY] = caller
        request = telemetry.current()
        if request is not None:
            request.caller(caller.key_name, caller.account)
        await self.app(scope, receive, send)

    def _identify(self, headers: Sequence[tuple[bytes, bytes]]) -> Caller:
        selected = _header(headers, b"x-selected-account-id")
        if not self.keys.enabled:
            return Caller(key_name=None, account=None, selected_account=selected, admin=True)
        key = self.keys.match(presented_key(headers))
        return Caller(key_name=key.name, account=key.account, selected_account=selected, admin=key.admin)


async def current_caller(request: Request) -> Caller:
    """FastAPI dependency: the caller ``ApiKeyAuth`` established.

    A route reached without the middleware having run (a path it was told to leave open)
    is refused rather than served as anonymous. A coroutine on purpose: FastAPI runs a
    plain function dependency in a worker thread, a thread hop per request.
    """
    caller = request.scope.get("state", {}).get(CALLER_STATE_KEY)
    if not isinstance(caller, Caller):
        raise AuthenticationError(MISSING_KEY)
    return caller
