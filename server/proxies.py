"""The client's address behind a reverse proxy (`server.trusted_proxies`).

Behind nginx or a load balancer every connection comes from the proxy, so per-client limits
(`limits.sockets_per_client`, `limits.contexts_per_client` without API keys) and every log line
would see one client. Where the connection comes from a trusted proxy, the client is the
rightmost address in `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the
address it was connected from, so entries left of the first untrusted one may be forged); where
it does not, `X-Forwarded-For` is ignored, so a client connecting directly cannot pose as
another. This is the rule of uvicorn's `--forwarded-allow-ips` and werkzeug's ProxyFix.
aiohttp-remotes was not used: its filtered mode reads the header whoever sends it, and its
strict one refuses direct connections.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Union

from aiohttp import hdrs, web

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """"10.0.0.0/8", "127.0.0.1", "::1" -> networks; ValueError names a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {entry!r}") from None
    return tuple(networks)


def forwarded_client(peer: str | None, forwarded_for: list[str],
                     trusted: tuple[Network, ...]) -> str | None:
    """The client's address for a connection from `peer` carrying these X-Forwarded-For
    headers (in order): the peer itself unless it is a trusted proxy."""
    if not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        if not _is_address(hop):
            break                      # nothing left of an unreadable entry can be believed
        client = hop
        if not _trusted(hop, trusted):
            break
    return client


def middleware(trusted: tuple[Network, ...]) -> Callable[[web.Request, Handler],
                                                         Awaitable[web.StreamResponse]]:
    """An aiohttp middleware that sets `request.remote` to the client behind trusted proxies."""
    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = forwarded_client(request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, []),
                                  trusted)
        if client != request.remote:
            request = request.clone(remote=client)
        return await handler(request)
    return forwarded


def _trusted(address: str | None, trusted: tuple[Network, ...]) -> bool:
    if not address or not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
