"""The client's address behind a reverse proxy (server/proxies.py)."""

from __future__ import annotations

import pytest

from server.config import ConfigError, HttpConfig
from server.proxies import forwarded_client, parse_networks

TRUSTED = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.parametrize("peer, headers, client", [
    # From a trusted proxy: the rightmost address that is not a proxy.
    ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),   # left of it may be forged
    ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),       # through a second proxy
    ("127.0.0.1", ["203.0.113.7", "10.1.2.3"], "203.0.113.7"),     # one header per hop
    ("::1", ["2001:db8::5"], "2001:db8::5"),
    ("127.0.0.1", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),             # all proxies: the leftmost
    ("127.0.0.1", [], "127.0.0.1"),                                 # no header: the proxy itself
    ("127.0.0.1", ["garbage, 10.1.2.3"], "10.1.2.3"),               # nothing past an unreadable hop
    ("127.0.0.1", ["203.0.113.7, unknown"], "127.0.0.1"),
    # From anywhere else the header is not read: a direct client cannot pose as another.
    ("192.0.2.44", ["203.0.113.7"], "192.0.2.44"),
    (None, ["203.0.113.7"], None),
])
def test_the_client_is_the_last_address_no_trusted_proxy_vouches_for(
        peer: str | None, headers: list[str], client: str | None) -> None:
    assert forwarded_client(peer, headers, TRUSTED) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert forwarded_client("127.0.0.1", ["203.0.113.7"], ()) == "127.0.0.1"


def test_a_bad_entry_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="server.trusted_proxies: not an IP address or network: "
                                          "'10.0.0.0/33'"):
        HttpConfig(trusted_proxies=("127.0.0.1", "10.0.0.0/33"))
