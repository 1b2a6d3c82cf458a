"""The address guard: an image URL must not turn this server against its own network.

A caller-chosen URL could point at loopback services, the private network or the cloud
metadata endpoint (169.254.169.254), which is server-side request forgery (vLLM
CVE-2025-6242). So the host is resolved once, *every* address it resolves to is checked,
and the fetcher then connects to the checked address itself: a second lookup could be
rebound to an internal address between check and connect. Spellings such as
``2130706433``, ``0x7f.1`` or ``127.1`` need no parsing here: the system resolver reads
them as 127.0.0.1, and the check runs on what it returns.

Only globally reachable addresses pass. Python's ``is_global`` alone is not enough (older
versions pass 192.0.0.8 and ``64:ff9b:1::/48``; none refuses site-local ``fec0::/10`` or
IPv4-translated ``::ffff:0:0:0/96``), so the blocks of the IANA special-purpose registries
are listed here too, and IPv6 must be global unicast (``2000::/3``). A refusal tells the
caller only that the host is not allowed: where an internal name points is the operator's
business, written to the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from server.errors import InvalidRequestError
from server.service.images.policy import ImagePolicy

logger = logging.getLogger(__name__)

# (host, port) -> the IP addresses to check; injectable so tests never touch real DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

# Lookups get threads of their own. getaddrinfo cannot be cancelled, and a blackholed name
# server holds each thread for its full timeout; on the default executor a burst of such
# lookups would starve what else runs there (tokenization, image decoding, engine
# start-up). Here they tie up at most these threads, and a lookup still waiting for one
# when its request's deadline passes is cancelled before it starts.
LOOKUP_THREADS = 8
_lookups = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="v4serve-dns")

# IPv6 forms whose packets go to the IPv4 address they carry: judged as that address.
_NAT64 = IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = IPv6Network("2000::/3")
# Special-purpose blocks (IANA registries) that are not globally reachable, named for the log.
_SPECIAL_PURPOSE: tuple[tuple[IPv4Network | IPv6Network, str], ...] = tuple(
    (ip_network(block), reason)
    for block, reason in (
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("192.0.0.0/24", "an IETF protocol assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay anycast address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::ffff:0:0:0/96", "an IPv4-translated address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/23", "an IETF protocol assignment address"),
        ("2001:db8::/32", "a documentation address"),
        ("2002::/16", "a 6to4 address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique local (private) address"),
        ("fec0::/10", "a site-local address"),
    )
)


async def system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(_lookups, _getaddrinfo, host, port)
    return [str(info[4][0]) for info in infos]


def _getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def refusal_reason(address: IPv4Address | IPv6Address) -> str | None:
    """Why the guard refuses ``address`` ("a loopback address"), or None for a public one."""
    carried = _carried_ipv4(address)
    return _reason(carried if carried is not None else address)


def _carried_ipv4(address: IPv4Address | IPv6Address) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def _reason(address: IPv4Address | IPv6Address) -> str | None:
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    for block, reason in _SPECIAL_PURPOSE:
        if address in block:
            return reason
    if not address.is_global:  # RFC 1918, 0.0.0.0/8 and the rest Python knows
        return "a private address"
    if isinstance(address, IPv6Address) and address not in _GLOBAL_UNICAST:
        return "a reserved address"
    return None


async def checked_address(host: str, port: int, policy: ImagePolicy, resolve: Resolver, *, param: str) -> str:
    """The address to connect to for ``host``, once every address it resolves to passed."""
    if not host:
        raise InvalidRequestError("image URL has no host", param=param)
    try:
        # What the resolver would do to the name anyway; an empty label or one over 63
        # characters fails here as the caller's mistake, not in getaddrinfo.
        host.encode("idna")
    except UnicodeError:
        raise InvalidRequestError(f"image URL host '{host}' is not a valid host name", param=param) from None
    # Checked before resolving, so a refused name is not even looked up.
    if policy.allowed_domains and host.lower().rstrip(".") not in policy.allowed_domains:
        raise InvalidRequestError(
            f"image URL host '{host}' is not among the domains this server fetches images from", param=param
        )
    try:
        found = await resolve(host, port)
    except OSError:  # socket.gaierror: no such name
        found = ()
    if not found:
        raise InvalidRequestError(f"image URL host '{host}' could not be resolved", param=param)
    addresses = [ip_address(address) for address in found]
    if not policy.allow_private_networks:
        for address in addresses:
            reason = refusal_reason(address)
            if reason is not None:
                logger.info("refused image URL host %s: it resolves to %s (%s)", host, reason, address)
                raise InvalidRequestError(
                    f"image URL host '{host}' is not allowed: this server fetches images only from public addresses",
                    param=param,
                )
    return str(addresses[0])
