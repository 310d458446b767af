"""Step 1 of the pipeline: who is the peer? A verified X.509-SVID -> SPIFFE ID.

Sources, in this order:

1. A TLS connection: the chain uvicorn put in the ASGI TLS extension
   (``scope["extensions"]["tls"]["client_cert_chain"]``, see :mod:`mtls.uvicorn`)
   is verified with :func:`mtls.x509svid.verify_svid`. No chain: ``no_peer_cert``.
2. ``X-Forwarded-Client-Cert`` (Envoy) is honoured only when the direct peer is a
   trusted proxy: a verified mTLS peer whose SPIFFE ID matches a trusted pattern,
   or a plain-TCP peer whose socket address is in a trusted network (the address
   :mod:`mtls.uvicorn` records from the socket, never ``scope["client"]``, which
   ``X-Forwarded-For`` can rewrite; without it no address is trusted). The
   header's LAST element (the nearest proxy's) must carry ``Cert`` (or ``Chain``),
   which is verified exactly like a direct peer certificate; an element with only
   ``URI`` is refused (``peer_not_svid``): a proxy's word is not a certificate.
   More than one XFCC header line from a trusted proxy is refused as malformed
   (``peer_not_svid``): a proxy sends one, so a second was added by someone else.
3. XFCC from any other peer is ignored, and that it was sent is recorded in the
   decision note.

Verification results are cached by the exact text of the leaf certificate
(bounded LRU), valid while the trust bundles are the same object (a reload or a
Workload API push yields a new one) and every certificate of the chain is inside
its validity window; so a keep-alive connection's chain is parsed once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from mtls._files import FileStamp, file_stamps
from mtls.x509bundle import BundleError, BundleSet
from mtls.x509svid import SvidError, VerifiedSvid, verify_svid
from mtls.xfcc import XfccError, parse_xfcc
from verifier.errors import VerifierError
from verifier.proxies import TrustedProxies

__all__ = [
    "BundleFiles",
    "PeerError",
    "PeerIdentity",
    "PeerResolver",
    "SvidCache",
]

_log = logging.getLogger(__name__)

_PEM_BODY_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)


class BundleFiles:
    """Trust bundles from PEM files (each may hold several trust domains' CAs),
    re-read when a file changes (checked at most every ``check_interval`` s).

    The first load must succeed (:class:`~mtls.x509bundle.BundleError`); a later
    set that does not load is reported once and the previous one kept. A reload
    yields a new :class:`BundleSet` object, which invalidates cached SVIDs.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike[str]], *, check_interval: float = 1.0
    ) -> None:
        if not paths:
            raise ValueError("at least one bundle file is needed")
        self._paths = tuple(Path(p) for p in paths)
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._bad: tuple[FileStamp | None, ...] | None = None
        self._bundles = self._load()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[FileStamp | None, ...]:
        return file_stamps(self._paths)

    def _load(self) -> BundleSet:
        merged: dict[object, list[object]] = {}
        for p in self._paths:
            loaded = BundleSet.from_file(p)
            for td in loaded:
                merged.setdefault(td, []).extend(loaded.get(td))
        return BundleSet(merged)  # type: ignore[arg-type]  # TrustDomain -> certificates

    def bundles(self) -> BundleSet:
        if time.monotonic() - self._checked >= self._interval and self._lock.acquire(False):
            try:
                self._checked = time.monotonic()
                stamp = self._stat()
                if stamp != self._stamp and stamp != self._bad and None not in stamp:
                    try:
                        fresh = self._load()
                    except BundleError as exc:
                        self._bad = stamp
                        _log.warning("bundle files changed but do not load; keeping: %s", exc)
                    else:
                        self._stamp, self._bad = stamp, None
                        if fresh != self._bundles:
                            self._bundles = fresh
            finally:
                self._lock.release()
        return self._bundles

    def close(self) -> None:
        return None


class PeerError(VerifierError):
    """The peer's identity could not be established; ``reason`` is a reason code."""

    def __init__(self, reason: str, detail: str, *, peer_cert: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.peer_cert = peer_cert  # x5t#S256 of the presented leaf, if it could be read
        self.note: str | None = None


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A verified peer. ``via`` names the trusted proxy it was forwarded by."""

    spiffe_id: str
    x5t_s256: str
    via: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class _Cached:
    svid: VerifiedSvid
    bundles: BundleSet
    not_before: datetime
    not_after: datetime


class SvidCache:
    """Bounded LRU of verified SVIDs keyed by the exact leaf text (PEM or DER)."""

    __slots__ = ("_entries", "_max", "hits", "misses")

    def __init__(self, maxsize: int = 1024) -> None:
        self._entries: OrderedDict[str | bytes, _Cached] = OrderedDict()
        self._max = maxsize
        self.hits = 0
        self.misses = 0

    def verify(
        self, chain: Sequence[str | bytes], bundles: BundleSet, now: datetime | None = None
    ) -> VerifiedSvid:
        """:func:`verify_svid`, answered from the cache when still valid."""
        at = now or datetime.now(UTC)
        key = chain[0]
        hit = self._entries.get(key)
        if hit is not None:
            if hit.bundles is bundles and hit.not_before <= at <= hit.not_after:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit.svid
            del self._entries[key]
        self.misses += 1
        svid = verify_svid(list(chain), bundles, now=at)
        if self._max > 0:
            entry = _Cached(
                svid,
                bundles,
                max(c.not_valid_before_utc for c in svid.chain),
                min(c.not_valid_after_utc for c in svid.chain),
            )
            self._entries[key] = entry
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return svid

    def __len__(self) -> int:
        return len(self._entries)


def _x5t_of_pem(pem: str | bytes) -> str | None:
    """Best-effort ``x5t#S256`` of a presented (maybe untrusted) certificate, for the log."""
    try:
        raw = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
        if raw.startswith(b"-----BEGIN"):
            m = _PEM_BODY_RE.search(raw)
            if m is None:
                return None
            der = base64.b64decode(re.sub(rb"\s+", b"", m.group(1)), validate=True)
        else:
            der = raw
    except (UnicodeError, ValueError):
        return None
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


class PeerResolver:
    """Resolves the peer of one request (see the module docstring)."""

    def __init__(
        self,
        bundles: Callable[[], BundleSet],
        trusted_proxies: TrustedProxies,
        *,
        cache_size: int = 1024,
    ) -> None:
        self._bundles = bundles
        self._trusted = trusted_proxies
        self.cache = SvidCache(cache_size)

    def _verify(self, chain: Sequence[str | bytes], what: str) -> VerifiedSvid:
        try:
            bundles = self._bundles()
        except Exception as exc:  # a closed or failed source: trust nothing
            raise PeerError(
                "peer_untrusted", f"no trust bundle available ({type(exc).__name__})"
            ) from None
        try:
            return self.cache.verify(chain, bundles)
        except SvidError as exc:
            raise PeerError(
                exc.reason, f"{what}: {exc.detail} [{exc.rule}]", peer_cert=_x5t_of_pem(chain[0])
            ) from None

    def resolve(
        self,
        tls_chain: Sequence[str | bytes] | None,
        client_ip: str | None,
        xfcc: str | None,
        *,
        xfcc_headers: int = 1,
    ) -> PeerIdentity:
        """The verified peer; raises :class:`PeerError`.

        ``tls_chain`` is the TLS extension's chain (``None`` for a plain-TCP
        connection, ``[]`` for TLS without a client certificate); ``client_ip`` the
        socket peer's address (``None`` if unknown: then no IP is trusted); ``xfcc``
        the XFCC header value or ``None``, and ``xfcc_headers`` how many header
        lines it came in (more than one from a trusted proxy: ``peer_not_svid``).
        """
        direct: VerifiedSvid | None = None
        if tls_chain:
            direct = self._verify(tls_chain, "client certificate")
            trusted = self._trusted.trusts_svid(direct.spiffe_id)
            proxy_name = str(direct.spiffe_id)
        else:
            trusted = tls_chain is None and self._trusted.trusts_ip(client_ip)
            proxy_name = f"ip {client_ip}"

        if xfcc is not None and trusted:
            if xfcc_headers != 1:
                raise PeerError(
                    "peer_not_svid",
                    f"x-forwarded-client-cert from {proxy_name} is malformed "
                    f"[{xfcc_headers} header lines, one expected]",
                )
            return self._from_xfcc(xfcc, proxy_name)
        note = None
        if xfcc is not None:
            note = "x-forwarded-client-cert ignored: the peer is not a trusted proxy"
        if direct is None:
            err = PeerError("no_peer_cert", "no client certificate was presented")
            err.note = note
            raise err
        return PeerIdentity(str(direct.spiffe_id), direct.x5t_s256, None, note)

    def _from_xfcc(self, header: str, proxy: str) -> PeerIdentity:
        try:
            element = parse_xfcc(header)[-1]
        except XfccError as exc:
            raise PeerError(
                "peer_not_svid", f"x-forwarded-client-cert from {proxy} is malformed [{exc.rule}]"
            ) from None
        if element.chain_pem:
            chain: tuple[bytes, ...] = element.chain_pem
            if element.cert_pem is not None and element.cert_pem != chain[0]:
                raise PeerError(
                    "peer_not_svid",
                    f"x-forwarded-client-cert from {proxy}: Cert is not the first of Chain",
                )
        elif element.cert_pem is not None:
            chain = (element.cert_pem,)
        else:
            raise PeerError(
                "peer_not_svid",
                f"x-forwarded-client-cert from {proxy} carries no Cert: "
                "an identity needs a certificate",
            )
        svid = self._verify(chain, f"forwarded certificate from {proxy}")
        return PeerIdentity(str(svid.spiffe_id), svid.x5t_s256, proxy, f"via trusted proxy {proxy}")
