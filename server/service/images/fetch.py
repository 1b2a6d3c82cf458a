"""Fetching one image over http(s), connecting only to addresses the guard approved.

Each hop's host goes through ``checked_address`` and the request is sent to that very
address: the URL's host becomes the checked IP while the Host header and the TLS server
name (``sni_hostname``) keep the name, so certificates are still verified against it and
no second DNS lookup can be rebound to an internal address. Redirects are followed here
rather than by httpx, so every hop is checked again (vLLM PR#55539). The body is read
raw, never decompressed, and no further than the byte limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from server.errors import InvalidRequestError
from server.service.images.guard import Resolver, checked_address
from server.service.images.policy import ImagePolicy

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


async def fetch_url(
    url: str, client: httpx.AsyncClient, policy: ImagePolicy, resolve: Resolver, *, param: str
) -> bytes:
    current = _web_url(url, param)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            async with _pinned_get(current, client, policy, resolve, param) as response:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    current = _web_url(str(current.join(location)), param)
                    continue
                if response.status_code != 200:
                    raise InvalidRequestError(f"image URL answered HTTP {response.status_code}", param=param)
                return await _read_capped(response, policy, param)
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise InvalidRequestError(f"image URL could not be fetched ({reason})", param=param) from exc
    raise InvalidRequestError(f"image URL redirected more than {MAX_REDIRECTS} times", param=param)


def _web_url(url: str, param: str) -> httpx.URL:
    # load.py sends only http(s) URLs here, so only a redirect can fail the scheme check:
    # a server must not bounce us to file: or data:.
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidRequestError(f"image URL is malformed ({exc})", param=param) from exc
    if parsed.scheme not in _DEFAULT_PORTS:
        raise InvalidRequestError(f"image URL redirected to a '{parsed.scheme}:' URL", param=param)
    return parsed


@asynccontextmanager
async def _pinned_get(
    url: httpx.URL, client: httpx.AsyncClient, policy: ImagePolicy, resolve: Resolver, param: str
) -> AsyncIterator[httpx.Response]:
    host = url.raw_host.decode("ascii")
    address = await checked_address(host, url.port or _DEFAULT_PORTS[url.scheme], policy, resolve, param=param)
    request = client.build_request(
        "GET",
        url.copy_with(host=address),
        # identity: a compressed body could inflate far past the byte limit.
        headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        extensions={"sni_hostname": host} if url.scheme == "https" else {},
    )
    response = await client.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()


async def _read_capped(response: httpx.Response, policy: ImagePolicy, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise policy.oversize(param=param)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise policy.oversize(param=param)
    return bytes(body)
