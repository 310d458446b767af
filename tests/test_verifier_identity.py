"""Step 1: peer identity from the TLS extension, or XFCC from a trusted proxy only."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.parse
from pathlib import Path

import pytest
from _pki_helpers import make_ca, make_leaf, pem
from _verifier_helpers import Pki, make_pki
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mtls.x509bundle import BundleSet
from verifier.config import TrustedProxies
from verifier.identity import BundleFiles, PeerError, PeerResolver

TRUSTED = TrustedProxies(["spiffe://example.org/proxy/*", "127.0.0.1/32"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("identity"))


@pytest.fixture
def resolver(pki: Pki) -> PeerResolver:
    bundles = BundleSet.from_file(pki.dev.bundle)
    return PeerResolver(lambda: bundles, TRUSTED)


def xfcc_for(pki: Pki, name: str, *, cert: bool = True, uri: bool = True) -> str:
    leaf = pki.leaf(name)
    der = leaf.public_bytes(Encoding.DER)
    parts = [f"By={pki.spiffe_id('envoy')}", f"Hash={hashlib.sha256(der).hexdigest()}"]
    if cert:
        parts.append(
            "Cert=" + urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe="")
        )
    if uri:
        parts.append(f"URI={pki.spiffe_id(name)}")
    return ";".join(parts)


def test_direct_peer(pki: Pki, resolver: PeerResolver) -> None:
    peer = resolver.resolve(pki.chain_pem("planner"), "127.0.0.1", None)
    assert peer.spiffe_id == "spiffe://example.org/agent/planner"
    assert peer.x5t_s256 == pki.cnf("planner")
    assert peer.via is None and peer.note is None


def test_no_certificate(resolver: PeerResolver) -> None:
    for chain in ([], None):
        with pytest.raises(PeerError) as info:
            resolver.resolve(chain, "10.1.1.1", None)
        assert info.value.reason == "no_peer_cert"


def test_other_trust_domain_is_untrusted(pki: Pki, resolver: PeerResolver) -> None:
    chain = [pki.other.cert("planner").read_text()]
    with pytest.raises(PeerError) as info:
        resolver.resolve(chain, "127.0.0.1", None)
    assert info.value.reason == "peer_untrusted"
    assert "other.org" in info.value.detail
    assert info.value.peer_cert is not None  # the presented leaf's hash, for the log


def test_not_an_svid(resolver: PeerResolver) -> None:
    ca = make_ca("example.org")
    leaf, _ = make_leaf(ca, uris=["https://example.org/not-spiffe"])
    with pytest.raises(PeerError) as info:
        resolver.resolve([pem(leaf).decode()], None, None)
    assert info.value.reason == "peer_not_svid"
    with pytest.raises(PeerError) as info:
        resolver.resolve(
            ["-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"], None, None
        )
    assert info.value.reason == "peer_not_svid"


def test_xfcc_from_trusted_svid_proxy(pki: Pki, resolver: PeerResolver) -> None:
    peer = resolver.resolve(pki.chain_pem("envoy"), "127.0.0.1", xfcc_for(pki, "planner"))
    assert peer.spiffe_id == pki.spiffe_id("planner")
    assert peer.x5t_s256 == pki.cnf("planner")
    assert peer.via == pki.spiffe_id("envoy")
    assert "via trusted proxy" in (peer.note or "")


def test_xfcc_last_element_wins(pki: Pki, resolver: PeerResolver) -> None:
    header = xfcc_for(pki, "worker") + "," + xfcc_for(pki, "planner")
    assert resolver.resolve(pki.chain_pem("envoy"), None, header).spiffe_id == pki.spiffe_id(
        "planner"
    )


def test_xfcc_from_untrusted_peer_is_ignored(pki: Pki, resolver: PeerResolver) -> None:
    peer = resolver.resolve(pki.chain_pem("worker"), "127.0.0.1", xfcc_for(pki, "planner"))
    assert peer.spiffe_id == pki.spiffe_id("worker")
    assert "ignored" in (peer.note or "")


def test_xfcc_uri_only_is_not_an_identity(pki: Pki, resolver: PeerResolver) -> None:
    header = xfcc_for(pki, "planner", cert=False)
    with pytest.raises(PeerError) as info:
        resolver.resolve(pki.chain_pem("envoy"), None, header)
    assert info.value.reason == "peer_not_svid"
    assert "no Cert" in info.value.detail


def test_xfcc_malformed_from_trusted_proxy(pki: Pki, resolver: PeerResolver) -> None:
    with pytest.raises(PeerError) as info:
        resolver.resolve(pki.chain_pem("envoy"), None, 'Cert="unterminated')
    assert info.value.reason == "peer_not_svid"


def test_xfcc_forwarded_cert_verified_like_a_peer(pki: Pki, resolver: PeerResolver) -> None:
    leaf = x509.load_pem_x509_certificate(pki.other.cert("planner").read_bytes())
    header = "Cert=" + urllib.parse.quote(leaf.public_bytes(Encoding.PEM).decode(), safe="")
    with pytest.raises(PeerError) as info:
        resolver.resolve(pki.chain_pem("envoy"), None, header)
    assert info.value.reason == "peer_untrusted"


def test_xfcc_over_plain_tcp_from_trusted_ip(pki: Pki, resolver: PeerResolver) -> None:
    peer = resolver.resolve(None, "127.0.0.1", xfcc_for(pki, "planner"))
    assert peer.spiffe_id == pki.spiffe_id("planner") and peer.via == "ip 127.0.0.1"
    # The same header from an address not trusted: ignored, and then there is no cert.
    with pytest.raises(PeerError) as info:
        resolver.resolve(None, "10.0.0.7", xfcc_for(pki, "planner"))
    assert info.value.reason == "no_peer_cert"
    assert "ignored" in (info.value.note or "")
    # IP trust applies to plain TCP only: a TLS peer without a certificate is not a proxy.
    with pytest.raises(PeerError) as info:
        resolver.resolve([], "127.0.0.1", xfcc_for(pki, "planner"))
    assert info.value.reason == "no_peer_cert"


def test_svid_cache(pki: Pki) -> None:
    bundles = [BundleSet.from_file(pki.dev.bundle)]
    resolver = PeerResolver(lambda: bundles[0], TRUSTED, cache_size=2)
    chain = pki.chain_pem("planner")
    for _ in range(3):
        resolver.resolve(chain, None, None)
    assert (resolver.cache.misses, resolver.cache.hits) == (1, 2)
    bundles[0] = BundleSet.from_file(pki.dev.bundle)  # a reload: new object
    resolver.resolve(chain, None, None)
    assert resolver.cache.misses == 2
    # Untrusted now: a bundle without example.org refuses even a cached leaf.
    bundles[0] = BundleSet.from_file(pki.other.bundle)
    with pytest.raises(PeerError):
        resolver.resolve(chain, None, None)
    bundles[0] = BundleSet.from_file(pki.dev.bundle)
    for name in ("worker", "payments", "issuer"):
        resolver.resolve(pki.chain_pem(name), None, None)
    assert len(resolver.cache) == 2  # bounded


def test_bundle_files_reload(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "bundle.pem"
    path.write_bytes(pki.dev.bundle.read_bytes())
    files = BundleFiles([path, pki.other.bundle], check_interval=0)
    first = files.bundles()
    assert {td.name for td in first} == {"example.org", "other.org"}
    assert files.bundles() is first  # unchanged: same object
    path.write_text("garbage")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert files.bundles() is first  # a bad file keeps the previous set
    path.write_bytes(make_ca("third.org").pem())
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert {td.name for td in files.bundles()} == {"third.org", "other.org"}


def test_several_xfcc_lines_from_a_trusted_proxy(pki: Pki, resolver: PeerResolver) -> None:
    header = xfcc_for(pki, "planner")
    with pytest.raises(PeerError) as info:
        resolver.resolve(pki.chain_pem("envoy"), None, header, xfcc_headers=2)
    assert info.value.reason == "peer_not_svid" and "2 header lines" in info.value.detail
    with pytest.raises(PeerError) as info:
        resolver.resolve(None, "127.0.0.1", header, xfcc_headers=2)
    assert info.value.reason == "peer_not_svid"
    # Not from a proxy: ignored as a single line would be.
    peer = resolver.resolve(pki.chain_pem("worker"), None, header, xfcc_headers=2)
    assert peer.spiffe_id == pki.spiffe_id("worker") and "ignored" in (peer.note or "")
