"""The address guard: an image URL must not turn this server against its own network.

A caller-chosen URL could point at loopback services, the private network or the cloud
metadata endpoint (169.254.169.254), which is server-side request forgery (vLLM
CVE-2025-6242). So the host is resolved once, *every* address it resolves to is checked,
and the fetcher then connects to the checked address itself: a second lookup could be
rebound to an internal address between check and connect. Spellings such as
``2130706433``, ``0x7f.1`` or ``127.1`` need no parsing here: the system resolver reads
them as 127.0.0.1, and the check runs on what it returns.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from server.errors import InvalidRequestError
from server.service.images.policy import ImagePolicy

# (host, port) -> the IP addresses to check; injectable so tests never touch real DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT: not public, yet not is_private
# IPv6 forms that carry an IPv4 address the packets really go to.
_IPV4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")


async def system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def refusal_reason(address: IPv4Address | IPv6Address) -> str | None:
    """Why the guard refuses ``address`` ("a loopback address"), or None for a public one."""
    embedded = _embedded_ipv4(address)
    return (embedded is not None and _own_reason(embedded)) or _own_reason(address)


def _embedded_ipv4(address: IPv4Address | IPv6Address) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    # :: and ::1 are themselves, not IPv4-compatible forms of 0.0.0.0 and 0.0.0.1.
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or address in _NAT64:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def _own_reason(address: IPv4Address | IPv6Address) -> str | None:
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address.is_private:  # Python's "not globally reachable": RFC 1918, fc00::/7, reserved ranges
        return "a private address"
    return None


async def checked_address(host: str, port: int, policy: ImagePolicy, resolve: Resolver, *, param: str) -> str:
    """The address to connect to for ``host``, once every address it resolves to passed."""
    if not host:
        raise InvalidRequestError("image URL has no host", param=param)
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
                raise InvalidRequestError(
                    f"image URL host '{host}' resolves to {reason} ({address}), which this server does not fetch",
                    param=param,
                )
    return str(addresses[0])
