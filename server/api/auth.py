"""API keys: ``x-api-key`` checked against keys from the environment or a keys file.

A key may name the account it belongs to (``key:account``), so usage can be attributed
without trusting a header the caller chooses.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from server.errors import AuthenticationError


class KeyRing:
    def __init__(self, keys: dict[str, str | None]):
        self._keys = keys

    @classmethod
    def from_sources(cls, env_value: str, keys_file: Path | None) -> KeyRing:
        items = [item for item in env_value.split(",")]
        if keys_file is not None:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
            items += [line for line in lines if not line.lstrip().startswith("#")]
        return cls(dict(_parse(items)))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def account_for(self, presented: str | None) -> str | None:
        """The account of a valid key; raises for a missing or unknown key."""
        if presented is None:
            raise AuthenticationError("missing API key: send it in the x-api-key header")
        # Compare against every key in constant time so timing reveals nothing.
        match = None
        for key, account in self._keys.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                match = (key, account)
        if match is None:
            raise AuthenticationError("invalid API key")
        return match[1]


def _parse(items: Iterable[str]) -> Iterable[tuple[str, str | None]]:
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, _, account = item.partition(":")
        yield key.strip(), (account.strip() or None)


async def authenticate(request: Request) -> str | None:
    """FastAPI dependency: the caller's account (``None`` when the server runs open)."""
    keys: KeyRing = request.app.state.v4.keys
    if not keys.enabled:
        return request.headers.get("x-selected-account-id")
    account = keys.account_for(request.headers.get("x-api-key"))
    return account or request.headers.get("x-selected-account-id")
