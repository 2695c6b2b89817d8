"""Is a caller inside the trusted networks? Used to fence the admin routes.

Forwarding headers are claims made by whoever sent the request, so they count only when the direct peer
is a trusted proxy; then the client is the right-most address that is not itself a trusted proxy (each
proxy appends the peer it saw, so everything left of the last trusted hop is the caller's say-so). When
both ``X-Forwarded-For`` and ``Forwarded`` are present we cannot know which one the proxy wrote, so the
caller is allowed only if every present header names an allowed client.

Who the direct peer is depends on the data plane (serve_app/dataplane.py). Behind Serve's Python proxy,
``request.client.host`` is already the ``X-Forwarded-For`` address when the peer was loopback (uvicorn's
default) and the real peer otherwise. Behind HAProxy the peer is HAProxy, for every client: the client is
what HAProxy states in ``x-iir-client-addr``, believed only beside the proxy token, and without the token
no address is trusted. List in ``trusted_proxies`` only the load balancers in front of the gateway.
Anything unparsable denies.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from serve_app.dataplane import CLIENT_ADDRESS_HEADER, PROXY_TOKEN_HEADER

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def parse_ip(value: str | None) -> IPAddress | None:
    """An address from a peer or header hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``), or None."""
    if not value:
        return None
    text = value.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        text = text.partition(":")[0]
    try:
        ip = ip_address(text)
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is 10.0.0.1 arriving on a dual-stack socket; judge it as IPv4.
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse_network(spec: str) -> IPNetwork:
    net = ip_network(spec.strip(), strict=False)
    mapped = net.network_address.ipv4_mapped if isinstance(net, IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        return IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


class NetworkSet:
    """Parsed networks, split by IP version so a lookup only scans its own family."""

    def __init__(self, networks: Iterable[str]) -> None:
        parsed = [_parse_network(n) for n in networks]  # a bad config entry raises ValueError at start-up
        self._v4 = tuple(n for n in parsed if n.version == 4)
        self._v6 = tuple(n for n in parsed if n.version == 6)

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, IPv4Address):
            return any(ip in n for n in self._v4)
        if isinstance(ip, IPv6Address):
            return any(ip in n for n in self._v6)
        return False

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)


@lru_cache(maxsize=32)
def network_set(networks: tuple[str, ...]) -> NetworkSet:
    """Cached so that settings' lists are parsed once, not on every admin request."""
    return NetworkSet(networks)


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    # Starlette's Headers keeps repeated lines (HAProxy adds one per hop); a dict has one value.
    getlist = getattr(headers, "getlist", None)
    if callable(getlist):
        return [v for v in getlist(name) if v.strip()]
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return [value] if value is not None and value.strip() else []


def _xff_hops(values: list[str]) -> list[str]:
    return [hop.strip() for value in values for hop in value.split(",")]


def _forwarded_hops(values: list[str]) -> list[str]:
    """The ``for=`` of each RFC 7239 element; an element without one is an unknown hop ("")."""
    hops = []
    for value in values:
        for element in value.split(","):
            pairs = (p.partition("=") for p in element.split(";"))
            hops.append(next((v.strip() for k, _, v in pairs if k.strip().lower() == "for"), ""))
    return hops


def _origin(hops: list[str], proxies: NetworkSet) -> IPAddress | None:
    """Right-most hop that is not a trusted proxy; None if a hop on the way is unparsable."""
    ip: IPAddress | None = None
    for hop in reversed(hops):
        ip = parse_ip(hop)
        if ip is None or ip not in proxies:
            return ip
    return ip  # every hop was a trusted proxy: the left-most one originated the request


def client_ips(
    peer: str | None, headers: Mapping[str, str] | None, proxies: NetworkSet
) -> list[IPAddress | None]:
    """Every client address the request plausibly comes from (one per forwarding header, or the peer)."""
    peer_ip = parse_ip(peer)
    if peer_ip is None or not headers or peer_ip not in proxies:
        return [peer_ip]
    chains = [
        hops
        for hops in (
            _xff_hops(_header_values(headers, "x-forwarded-for")),
            _forwarded_hops(_header_values(headers, "forwarded")),
        )
        if hops
    ]
    if not chains:
        return [peer_ip]  # the trusted proxy called us itself
    return [_origin(hops, proxies) for hops in chains]


def _single_value(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    return values[0].strip() if len(values) == 1 else None


def connecting_address(peer: str | None, headers: Mapping[str, str] | None, *,
                       proxy_token: str | None, behind_proxy: bool) -> str | None:
    """The address the client connected to the data plane from, or None when nobody can say.

    The data plane's own statement when the token vouches for it; else the TCP peer, unless a proxy that
    hides its clients (HAProxy) stands in between: then the peer is that proxy, for everyone.
    """
    if proxy_token and headers:
        token = _single_value(headers, PROXY_TOKEN_HEADER)
        if token is not None and hmac.compare_digest(token.encode(), proxy_token.encode()):
            return _single_value(headers, CLIENT_ADDRESS_HEADER)
    return None if behind_proxy else peer


def is_allowed_ip(
    peer: str | None,
    headers: Mapping[str, str] | None = None,
    *,
    trusted_networks: Sequence[str],
    trusted_proxies: Sequence[str] = (),
    proxy_token: str | None = None,
    behind_proxy: bool = False,
) -> bool:
    """Is the caller inside ``trusted_networks``? ``peer`` is the TCP peer; ``behind_proxy`` says it is
    a proxy hiding its clients (HAProxy), so that only a statement vouched for by ``proxy_token`` counts."""
    allowed = network_set(tuple(trusted_networks))
    proxies = network_set(tuple(trusted_proxies))
    client = connecting_address(peer, headers, proxy_token=proxy_token, behind_proxy=behind_proxy)
    return all(ip is not None and ip in allowed for ip in client_ips(client, headers, proxies))
