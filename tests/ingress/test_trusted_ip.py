"""is_allowed_ip: who counts as an internal caller, with and without proxies in front.

Addresses: 10.0.0.0/8, loopback and fd00::/8 are "inside"; 203.0.113.10/.11 and 2001:db8::10 are load
balancers we trust to forward; 198.51.100.7 is an outsider.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from starlette.datastructures import Headers

from serve_app.ingress.trusted_ip import is_allowed_ip, network_set, parse_ip

INSIDE = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "fd00::/8")
LBS = ("203.0.113.10", "203.0.113.11", "2001:db8::10")
LB = "203.0.113.10"
OUTSIDER = "198.51.100.7"


def xff(value: str) -> dict[str, str]:
    return {"x-forwarded-for": value}


def fwd(value: str) -> dict[str, str]:
    return {"forwarded": value}


CASES = [
    # direct peers, no proxy configured
    pytest.param("127.0.0.1", None, (), True, id="loopback"),
    pytest.param("10.1.2.3", None, (), True, id="private-v4"),
    pytest.param(OUTSIDER, None, (), False, id="public-v4"),
    pytest.param("::1", None, (), True, id="loopback-v6"),
    pytest.param("fd00::5", None, (), True, id="ula-v6"),
    pytest.param("2001:db8::5", None, (), False, id="public-v6"),
    pytest.param("::ffff:10.1.2.3", None, (), True, id="v4-mapped-inside"),
    pytest.param("::ffff:198.51.100.7", None, (), False, id="v4-mapped-outside"),
    # forwarding headers from peers we do not trust are ignored
    pytest.param(OUTSIDER, xff("127.0.0.1"), (), False, id="spoofed-xff-no-proxies"),
    pytest.param(OUTSIDER, xff("127.0.0.1"), LBS, False, id="spoofed-xff-untrusted-peer"),
    pytest.param(OUTSIDER, fwd("for=10.1.2.3"), LBS, False, id="spoofed-forwarded-untrusted-peer"),
    pytest.param("10.1.2.3", xff(OUTSIDER), (), True, id="inside-peer-header-ignored"),
    # Serve's proxy already replaced a loopback peer by its X-Forwarded-For; the header stays visible
    pytest.param(OUTSIDER, xff(OUTSIDER), ("127.0.0.1",), False, id="serve-proxy-rewritten-peer"),
    # through trusted load balancers
    pytest.param(LB, xff("10.1.2.3"), LBS, True, id="lb-inside-client"),
    pytest.param(LB, xff(OUTSIDER), LBS, False, id="lb-outside-client"),
    pytest.param(LB, xff(f"127.0.0.1, {OUTSIDER}"), LBS, False, id="lb-client-prepends-loopback"),
    pytest.param(LB, xff("10.1.2.3, 203.0.113.11"), LBS, True, id="lb-chain-inside"),
    pytest.param(LB, xff(f"10.1.2.3, {OUTSIDER}, 203.0.113.11"), LBS, False, id="lb-chain-untrusted-hop"),
    pytest.param(LB, xff("203.0.113.11"), LBS, False, id="lb-chain-only-proxies"),
    pytest.param(LB, None, LBS, False, id="lb-itself-outside"),
    pytest.param("10.0.0.1", None, ("10.0.0.1",), True, id="inside-proxy-itself"),
    pytest.param(LB, xff("10.1.2.3:5555"), LBS, True, id="lb-xff-with-port"),
    pytest.param(LB, xff("[fd00::5]:443"), LBS, True, id="lb-xff-bracketed-v6"),
    pytest.param(LB, xff("fd00::5"), LBS, True, id="lb-xff-v6"),
    pytest.param("2001:db8::10", xff("10.1.2.3"), LBS, True, id="v6-lb"),
    pytest.param("::ffff:203.0.113.10", xff("10.1.2.3"), LBS, True, id="v4-mapped-lb"),
    pytest.param(LB, xff("::ffff:10.1.2.3"), LBS, True, id="lb-xff-v4-mapped"),
    pytest.param(LB, xff("10.1.2.3"), ("203.0.113.0/24",), True, id="lb-cidr"),
    pytest.param(LB, {"X-Forwarded-For": "10.1.2.3"}, LBS, True, id="header-name-case"),
    pytest.param(LB, xff(""), LBS, False, id="lb-empty-xff-means-lb"),
    # RFC 7239
    pytest.param(LB, fwd("for=10.1.2.3;proto=https"), LBS, True, id="forwarded-inside"),
    pytest.param(LB, fwd('for="[fd00::5]:4711"'), LBS, True, id="forwarded-quoted-v6"),
    pytest.param(LB, fwd(f"for={OUTSIDER}"), LBS, False, id="forwarded-outside"),
    pytest.param(LB, fwd("for=10.1.2.3, for=203.0.113.11"), LBS, True, id="forwarded-chain"),
    pytest.param(LB, fwd("for=unknown"), LBS, False, id="forwarded-unknown"),
    pytest.param(LB, fwd("proto=https"), LBS, False, id="forwarded-without-for"),
    pytest.param(LB, xff("10.1.2.3") | fwd(f"for={OUTSIDER}"), LBS, False, id="headers-disagree"),
    pytest.param(LB, xff("10.1.2.3") | fwd("for=10.9.9.9"), LBS, True, id="headers-agree"),
    # garbage
    pytest.param(None, None, (), False, id="no-peer"),
    pytest.param("", None, (), False, id="empty-peer"),
    pytest.param("testclient", None, (), False, id="hostname-peer"),
    pytest.param("999.1.1.1", None, (), False, id="bad-octet"),
    pytest.param("10.1.2.3/8", None, (), False, id="cidr-as-peer"),
    pytest.param("[::1", None, (), False, id="unclosed-bracket"),
    pytest.param(LB, xff("not-an-ip"), LBS, False, id="xff-garbage"),
    pytest.param(LB, xff("10.1.2.3, , 203.0.113.11"), LBS, False, id="xff-empty-hop"),
    pytest.param(LB, xff("10.1.2.3,\x00"), LBS, False, id="xff-control-char"),
]


@pytest.mark.parametrize(("peer", "headers", "proxies", "allowed"), CASES)
def test_is_allowed_ip(
    peer: str | None, headers: Mapping[str, str] | None, proxies: tuple[str, ...], allowed: bool
) -> None:
    assert is_allowed_ip(peer, headers, trusted_networks=INSIDE, trusted_proxies=proxies) is allowed


def test_repeated_header_lines_are_all_read() -> None:
    # HAProxy adds a line per hop: the client's own line comes first, the proxy's last.
    headers = Headers(raw=[(b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-for", OUTSIDER.encode())])
    assert not is_allowed_ip(LB, headers, trusted_networks=INSIDE, trusted_proxies=LBS)
    headers = Headers(raw=[(b"x-forwarded-for", OUTSIDER.encode()), (b"x-forwarded-for", b"10.1.2.3")])
    assert is_allowed_ip(LB, headers, trusted_networks=INSIDE, trusted_proxies=LBS)


def test_v4_mapped_network_in_config_matches_v4_peers() -> None:
    assert is_allowed_ip("10.1.2.3", trusted_networks=["::ffff:10.0.0.0/104"])


def test_lists_are_parsed_once() -> None:
    network_set.cache_clear()
    for _ in range(100):
        is_allowed_ip("10.1.2.3", trusted_networks=list(INSIDE), trusted_proxies=list(LBS))
    info = network_set.cache_info()
    assert info.misses == 2 and info.hits == 198


def test_bad_network_in_config_is_an_error() -> None:
    with pytest.raises(ValueError):
        is_allowed_ip("10.1.2.3", trusted_networks=["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("10.1.2.3", "10.1.2.3", id="v4"),
        pytest.param(" 10.1.2.3:80 ", "10.1.2.3", id="v4-port-spaces"),
        pytest.param("[::1]:80", "::1", id="v6-port"),
        pytest.param('"[::1]"', "::1", id="quoted"),
        pytest.param("::ffff:1.2.3.4", "1.2.3.4", id="mapped"),
        pytest.param("_hidden", None, id="obfuscated"),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    ip = parse_ip(text)
    assert (str(ip) if ip is not None else None) == expected


# Behind HAProxy the TCP peer is HAProxy for every client (127.0.0.1 on one node, a node's private
# address across nodes): only HAProxy's own statement, vouched for by the proxy token, names the client.
TOKEN = "t0ken-" + "x" * 40
HAPROXY_PEERS = ("127.0.0.1", "10.0.0.7")


def stated(client: str, token: str = TOKEN) -> dict[str, str]:
    return {"x-iir-client-addr": client, "x-iir-proxy-token": token}


BEHIND_PROXY = [
    pytest.param(stated("127.0.0.1"), True, id="local-client"),
    pytest.param(stated("10.1.2.3"), True, id="inside-client"),
    pytest.param(stated(OUTSIDER), False, id="outside-client"),
    pytest.param(stated("127.0.0.1", "wrong"), False, id="wrong-token"),
    pytest.param(stated("127.0.0.1", TOKEN[:-1]), False, id="token-prefix"),
    pytest.param({"x-iir-client-addr": "127.0.0.1"}, False, id="no-token"),
    pytest.param(None, False, id="nothing-stated"),
    pytest.param(xff("127.0.0.1"), False, id="forged-xff"),
    pytest.param(fwd("for=127.0.0.1") | {"x-real-ip": "127.0.0.1"}, False, id="forged-forwarded"),
    pytest.param(stated(OUTSIDER) | xff("127.0.0.1"), False, id="outside-client-forged-xff"),
    pytest.param(stated("not-an-ip"), False, id="garbage-address"),
]


@pytest.mark.parametrize("peer", HAPROXY_PEERS)
@pytest.mark.parametrize(("headers", "allowed"), BEHIND_PROXY)
def test_behind_haproxy_only_the_vouched_statement_counts(
    peer: str, headers: Mapping[str, str] | None, allowed: bool
) -> None:
    assert is_allowed_ip(peer, headers, trusted_networks=INSIDE, proxy_token=TOKEN,
                         behind_proxy=True) is allowed


def test_behind_haproxy_without_a_token_no_address_is_trusted() -> None:
    # An HAProxy started without the shim, or a token never shared: fail closed, even for loopback.
    for headers in (None, stated("127.0.0.1"), stated("127.0.0.1", "")):
        assert not is_allowed_ip("127.0.0.1", headers, trusted_networks=INSIDE, behind_proxy=True)


def test_a_repeated_statement_is_refused() -> None:
    headers = Headers(raw=[(b"x-iir-client-addr", b"127.0.0.1"), (b"x-iir-client-addr", OUTSIDER.encode()),
                           (b"x-iir-proxy-token", TOKEN.encode())])
    assert not is_allowed_ip("127.0.0.1", headers, trusted_networks=INSIDE, proxy_token=TOKEN,
                             behind_proxy=True)


def test_without_a_hiding_proxy_the_peer_counts_and_a_statement_needs_the_token() -> None:
    # Serve's Python proxy: the peer is the client; a forged statement without the token changes nothing.
    assert is_allowed_ip("127.0.0.1", stated(OUTSIDER, "guess"), trusted_networks=INSIDE, proxy_token=TOKEN)
    assert not is_allowed_ip(OUTSIDER, stated("127.0.0.1", "guess"), trusted_networks=INSIDE,
                             proxy_token=TOKEN)


def test_load_balancer_in_front_of_haproxy() -> None:
    # HAProxy states the LB's address; the LB is a trusted proxy, so its X-Forwarded-For names the client.
    assert is_allowed_ip("127.0.0.1", stated(LB) | xff("10.1.2.3"), trusted_networks=INSIDE,
                         trusted_proxies=LBS, proxy_token=TOKEN, behind_proxy=True)
    assert not is_allowed_ip("127.0.0.1", stated(LB) | xff(OUTSIDER), trusted_networks=INSIDE,
                             trusted_proxies=LBS, proxy_token=TOKEN, behind_proxy=True)
