"""``TrustedProxies``: the peers whose ``X-Forwarded-Client-Cert`` header is believed."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern
from verifier.errors import ConfigError

__all__ = ["TrustedProxies"]


class TrustedProxies:
    """Peers whose ``X-Forwarded-Client-Cert`` header is believed.

    ``spiffe://`` entries are SPIFFE ID patterns matched against a verified mTLS
    peer; other entries are IP addresses or CIDR networks (host bits zero) matched
    against the socket peer address of a plain-TCP connection (a sidecar on
    loopback), as :mod:`mtls.uvicorn`'s protocol classes record it; a server that
    does not record it gets no IP trusted.
    """

    __slots__ = ("_networks", "_patterns", "items")

    def __init__(self, items: Sequence[str] = ()) -> None:
        if isinstance(items, str):
            raise ConfigError("must be a list", key="trusted_proxies")
        patterns: list[SpiffeIdPattern] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for index, item in enumerate(items):
            key = f"trusted_proxies[{index}]"
            if not isinstance(item, str) or not item:
                raise ConfigError("must be a SPIFFE ID pattern or an IP/CIDR", key=key)
            if item.startswith("spiffe://"):
                try:
                    patterns.append(SpiffeIdPattern.parse(item))
                except SpiffeIdError as exc:
                    raise ConfigError(str(exc), key=key) from None
            else:
                try:
                    networks.append(ipaddress.ip_network(item, strict=True))
                except ValueError:
                    raise ConfigError(
                        "is neither a spiffe:// pattern nor an IP address/CIDR with zero host bits",
                        key=key,
                    ) from None
        self.items: tuple[str, ...] = tuple(items)
        self._patterns = tuple(patterns)
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and other.items == self.items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.items)!r})"

    @property
    def has_networks(self) -> bool:
        """Whether any entry is an IP address or network (not a SPIFFE ID pattern)."""
        return bool(self._networks)

    def trusts_svid(self, spiffe_id: SpiffeId) -> bool:
        return any(p.matches(spiffe_id) for p in self._patterns)

    def trusts_ip(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
        return any(ip in n or (mapped is not None and mapped in n) for n in self._networks)
