"""X.509-SVID verification and trust bundles, against certificates built here."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest
from _pki_helpers import TestCA, der, key_usage, make_ca, make_leaf, now, pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls.spiffeid import SpiffeId, TrustDomain
from mtls.x509bundle import BundleError, BundleSet
from mtls.x509svid import (
    MAX_CHAIN_LENGTH,
    NotAnSvidError,
    SvidError,
    UntrustedSvidError,
    VerifiedSvid,
    load_chain,
    verify_svid,
    x5t_s256,
)

A = TrustDomain.parse("example.org")
B = TrustDomain.parse("other.org")


@pytest.fixture(scope="module")
def ca_a() -> TestCA:
    return make_ca("example.org")


@pytest.fixture(scope="module")
def ca_b() -> TestCA:
    return make_ca("other.org")


@pytest.fixture(scope="module")
def bundles(ca_a: TestCA, ca_b: TestCA) -> BundleSet:
    return BundleSet({A: [ca_a.cert], B: [ca_b.cert]})


@pytest.fixture(scope="module")
def good_leaf(ca_a: TestCA) -> x509.Certificate:
    return make_leaf(ca_a, ["spiffe://example.org/agent/planner"])[0]


def _b64url_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def _refused(chain: object, bundles: BundleSet, exc: type[SvidError], rule: str, **kw: object):
    with pytest.raises(exc) as info:
        verify_svid(chain, bundles, **kw)  # type: ignore[arg-type]
    assert info.value.rule == rule, str(info.value)
    assert info.value.reason == ("peer_not_svid" if exc is NotAnSvidError else "peer_untrusted")
    return info.value


# -- accepted ----------------------------------------------------------------------


def test_valid_svid_accepted_with_x5t(good_leaf: x509.Certificate, bundles: BundleSet) -> None:
    v = verify_svid([good_leaf], bundles)
    assert isinstance(v, VerifiedSvid)
    assert v.spiffe_id == SpiffeId.parse("spiffe://example.org/agent/planner")
    assert v.x5t_s256 == _b64url_sha256(der(good_leaf))
    assert "=" not in v.x5t_s256 and len(v.x5t_s256) == 43
    assert v.leaf == good_leaf
    assert v.chain == (good_leaf,)


@pytest.mark.parametrize(
    "form",
    ["der", "pem_bytes", "pem_str", "der_list", "pem_list", "cert_list", "pem_str_list"],
)
def test_input_forms(form: str, good_leaf: x509.Certificate, bundles: BundleSet) -> None:
    chain = {
        "der": der(good_leaf),
        "pem_bytes": pem(good_leaf),
        "pem_str": pem(good_leaf).decode(),
        "der_list": [der(good_leaf)],
        "pem_list": [pem(good_leaf)],
        "cert_list": [good_leaf],
        "pem_str_list": [pem(good_leaf).decode()],
    }[form]
    v = verify_svid(chain, bundles)
    assert str(v.spiffe_id) == "spiffe://example.org/agent/planner"
    assert v.x5t_s256 == x5t_s256(der(good_leaf)) == x5t_s256(good_leaf)


def test_intermediate_chain(ca_a: TestCA) -> None:
    inter = make_ca("example.org", issuer=ca_a)
    leaf, _ = make_leaf(inter, ["spiffe://example.org/svc/payments"])
    bs = BundleSet({A: [ca_a.cert]})
    # One PEM blob, and a DER list, leaf first.
    for chain in (pem(leaf, inter.cert), [der(leaf), der(inter.cert)]):
        v = verify_svid(chain, bs)
        assert v.chain == (leaf, inter.cert)
        assert v.x5t_s256 == _b64url_sha256(der(leaf))
    # Without its intermediate the leaf does not chain to the root.
    _refused([leaf], bs, UntrustedSvidError, "chain_invalid")


def test_leaf_without_basic_constraints_is_not_a_ca(ca_a: TestCA, bundles: BundleSet) -> None:
    # RFC 5280 (and go-spiffe): an absent basicConstraints means cA=FALSE.
    leaf, _ = make_leaf(ca_a, basic_constraints=None)
    assert str(verify_svid([leaf], bundles).spiffe_id) == "spiffe://example.org/workload"


def test_leaf_without_eku_is_accepted(ca_a: TestCA, bundles: BundleSet) -> None:
    # The X509-SVID spec does not require an EKU; cryptography's client profile allows
    # its absence (present, it must include clientAuth).
    leaf, _ = make_leaf(ca_a, eku=None)
    assert verify_svid([leaf], bundles).leaf == leaf


def test_leaf_with_server_auth_only_eku_refused(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    _refused([leaf], bundles, UntrustedSvidError, "chain_invalid")


def test_explicit_now(ca_a: TestCA, bundles: BundleSet) -> None:
    t = now()
    leaf, _ = make_leaf(
        ca_a, not_before=t - timedelta(minutes=1), not_after=t + timedelta(minutes=10)
    )
    verify_svid([leaf], bundles, now=t + timedelta(minutes=5))
    verify_svid([leaf], bundles, now=(t + timedelta(minutes=5)).replace(tzinfo=None))
    _refused([leaf], bundles, UntrustedSvidError, "expired", now=t + timedelta(minutes=11))


# -- refused: trust ----------------------------------------------------------------


def test_wrong_ca_same_trust_domain(bundles: BundleSet) -> None:
    rogue = make_ca("example.org")
    leaf, _ = make_leaf(rogue, ["spiffe://example.org/agent/planner"])
    e = _refused([leaf], bundles, UntrustedSvidError, "chain_invalid")
    assert "example.org" in str(e)


def test_other_trust_domains_ca_cannot_vouch(
    ca_a: TestCA, ca_b: TestCA, bundles: BundleSet
) -> None:
    # TD B's CA is trusted (for B) but signs an ID in A: only A's bundle counts.
    leaf, _ = make_leaf(ca_b, ["spiffe://example.org/agent/planner"])
    _refused([leaf], bundles, UntrustedSvidError, "chain_invalid")
    # ... even when B's CA is presented in the chain as if it were an intermediate.
    _refused([leaf, ca_b.cert], bundles, UntrustedSvidError, "chain_invalid")
    # The same CA's own IDs are fine.
    ok, _ = make_leaf(ca_b, ["spiffe://other.org/x"])
    assert verify_svid([ok], bundles).spiffe_id.trust_domain == B


def test_unknown_trust_domain(bundles: BundleSet) -> None:
    ca_c = make_ca("third.org")
    leaf, _ = make_leaf(ca_c, ["spiffe://third.org/x"])
    _refused([leaf], bundles, UntrustedSvidError, "unknown_trust_domain")
    _refused([leaf], BundleSet({}), UntrustedSvidError, "unknown_trust_domain")


def test_expired(ca_a: TestCA, bundles: BundleSet) -> None:
    t = now()
    leaf, _ = make_leaf(ca_a, not_before=t - timedelta(hours=2), not_after=t - timedelta(hours=1))
    _refused([leaf], bundles, UntrustedSvidError, "expired")


def test_not_yet_valid(ca_a: TestCA, bundles: BundleSet) -> None:
    t = now()
    leaf, _ = make_leaf(ca_a, not_before=t + timedelta(hours=1), not_after=t + timedelta(hours=2))
    _refused([leaf], bundles, UntrustedSvidError, "not_yet_valid")


def test_expired_ca(bundles: BundleSet) -> None:
    t = now()
    old = make_ca("example.org", not_before=t - timedelta(days=2), not_after=t - timedelta(days=1))
    leaf, _ = make_leaf(old, not_before=t - timedelta(days=2), not_after=t + timedelta(hours=1))
    _refused([leaf], BundleSet({A: [old.cert]}), UntrustedSvidError, "chain_invalid")


def test_self_signed_leaf(bundles: BundleSet) -> None:
    leaf, _ = make_leaf(None, ["spiffe://example.org/agent/planner"])
    _refused([leaf], bundles, UntrustedSvidError, "chain_invalid")


def test_ca_cert_in_bundle_is_not_a_valid_svid(ca_a: TestCA, bundles: BundleSet) -> None:
    # The trust anchor itself, presented as a leaf: a CA with the TD's own ID.
    _refused([ca_a.cert], bundles, NotAnSvidError, "empty_path")


def test_chain_too_long(good_leaf: x509.Certificate, bundles: BundleSet) -> None:
    _refused([good_leaf] * (MAX_CHAIN_LENGTH + 1), bundles, UntrustedSvidError, "chain_too_long")
    _refused(
        pem(*[good_leaf] * (MAX_CHAIN_LENGTH + 1)), bundles, UntrustedSvidError, "chain_too_long"
    )


# -- refused: not an X509-SVID ------------------------------------------------------


def test_two_uri_sans(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ["spiffe://example.org/a", "spiffe://example.org/b"])
    _refused([leaf], bundles, NotAnSvidError, "uri_san_count")


def test_no_uri_san(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, [], dns_names=["planner.example.org"])
    _refused([leaf], bundles, NotAnSvidError, "uri_san_count")
    bare, _ = make_leaf(ca_a, [])  # no SAN extension at all
    _refused([bare], bundles, NotAnSvidError, "uri_san_count")


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.org/agent/planner",
        "spiffe://Example.org/agent/planner",
        "spiffe://example.org/agent/planner/",
        "spiffe://example.org/agent/%70lanner",
        "spiffe://example.org:443/agent/planner",
        "spiffe://example.org/agent/../planner",
    ],
)
def test_non_spiffe_uri(uri: str, ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, [uri])
    _refused([leaf], bundles, NotAnSvidError, "not_spiffe_uri")


def test_trust_domain_id_is_not_a_workload(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ["spiffe://example.org"])
    _refused([leaf], bundles, NotAnSvidError, "empty_path")


def test_ca_leaf(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, basic_constraints=x509.BasicConstraints(ca=True, path_length=None))
    _refused([leaf], bundles, NotAnSvidError, "leaf_is_ca")


def test_key_cert_sign_leaf(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ku=key_usage(key_cert_sign=True))
    _refused([leaf], bundles, NotAnSvidError, "key_cert_sign")


def test_crl_sign_leaf(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ku=key_usage(crl_sign=True))
    _refused([leaf], bundles, NotAnSvidError, "crl_sign")


def test_missing_digital_signature(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ku=key_usage(digital_signature=False))
    _refused([leaf], bundles, NotAnSvidError, "no_digital_signature")


def test_no_key_usage(ca_a: TestCA, bundles: BundleSet) -> None:
    leaf, _ = make_leaf(ca_a, ku=None)
    _refused([leaf], bundles, NotAnSvidError, "no_key_usage")


@pytest.mark.parametrize("chain", [[], (), b"", "", b"  \n"])
def test_empty_chain(chain: object, bundles: BundleSet) -> None:
    _refused(chain, bundles, NotAnSvidError, "empty_chain")


@pytest.mark.parametrize(
    "chain",
    [
        b"\x00garbage",
        [b"\x30\x03\x02\x01\x00"],
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        "caf\u00e9",
        [42],
        42,
    ],
)
def test_garbage(chain: object, bundles: BundleSet) -> None:
    _refused(chain, bundles, NotAnSvidError, "unparseable")


def _with_extension_oid_swapped(ca: TestCA, value: bytes) -> bytes:
    """DER of a leaf whose extra extension (OID 2.5.29.99, ``value``) is renamed to
    subjectAltName (2.5.29.17): the builder refuses to make such certificates."""
    leaf, _ = make_leaf(ca, uris=["spiffe://example.org/a"])
    b = x509.CertificateBuilder(
        issuer_name=leaf.issuer,
        subject_name=leaf.subject,
        public_key=leaf.public_key(),
        serial_number=leaf.serial_number,
        not_valid_before=leaf.not_valid_before_utc,
        not_valid_after=leaf.not_valid_after_utc,
        extensions=list(leaf.extensions),
    )
    fake = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), value)
    cert = b.add_extension(fake, critical=False).sign(ca.key, hashes.SHA256())
    raw = der(cert)
    marker = b"\x06\x03\x55\x1d\x63"
    assert raw.count(marker) == 1
    return raw.replace(marker, b"\x06\x03\x55\x1d\x11")


def test_duplicate_san_extension(ca_a: TestCA, bundles: BundleSet) -> None:
    # A second SAN extension could smuggle a second identity: refuse to parse it.
    second = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("spiffe://example.org/b")]
    ).public_bytes()
    _refused(_with_extension_oid_swapped(ca_a, second), bundles, NotAnSvidError, "unparseable")


def test_malformed_san_extension(ca_a: TestCA, bundles: BundleSet) -> None:
    raw = _with_extension_oid_swapped(ca_a, b"\x30\x05\x86\x09abc")
    # Depending on the order, the duplicate or the bad DER is met first: both unparseable.
    _refused(raw, bundles, NotAnSvidError, "unparseable")


def test_leaf_checks_come_before_trust(bundles: BundleSet) -> None:
    # A broken leaf from an unknown CA names the spec violation, not the trust failure.
    rogue = make_ca("third.org")
    leaf, _ = make_leaf(rogue, ["spiffe://third.org/a", "spiffe://third.org/b"])
    _refused([leaf], bundles, NotAnSvidError, "uri_san_count")


def test_error_types() -> None:
    e = NotAnSvidError("uri_san_count", "two URIs")
    assert isinstance(e, SvidError) and e.reason == "peer_not_svid"
    assert "uri_san_count" in str(e) and e.detail == "two URIs"
    u = UntrustedSvidError("expired", "old")
    assert isinstance(u, SvidError) and u.reason == "peer_untrusted"


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.lists(st.binary(max_size=200), max_size=4)))
def test_random_input_only_typed_errors(data: bytes | list[bytes]) -> None:
    bs = BundleSet({})
    with pytest.raises(SvidError):
        verify_svid(data, bs)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_pem_wrapped_garbage_is_unparseable(body: bytes) -> None:
    blob = (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(body) + b"-----END CERTIFICATE-----\n"
    )
    with pytest.raises(NotAnSvidError):
        load_chain(blob)


@given(st.binary(max_size=2000))
def test_x5t_matches_hashlib(data: bytes) -> None:
    assert x5t_s256(data) == _b64url_sha256(data)


# -- bundles ------------------------------------------------------------------------


def test_bundle_from_pem_by_uri_san(ca_a: TestCA, ca_b: TestCA) -> None:
    bs = BundleSet.from_pem(ca_a.pem() + ca_b.pem())
    assert bs.trust_domains == frozenset({A, B})
    assert bs.get(A) == (ca_a.cert,)
    assert bs.get(B) == (ca_b.cert,)
    assert bs.get(TrustDomain.parse("third.org")) == ()
    assert set(bs.all_certificates()) == {ca_a.cert, ca_b.cert}
    # Round trip through PEM.
    assert BundleSet.from_pem(bs.to_pem()) == bs


def test_bundle_explicit_trust_domain(ca_a: TestCA) -> None:
    plain = make_ca("example.org", uri=None)
    bs = BundleSet.from_pem(plain.pem() + ca_a.pem(), "spiffe://example.org")
    assert bs.trust_domains == frozenset({A})
    assert bs.get(A) == (plain.cert, ca_a.cert)
    # Duplicates collapse.
    assert BundleSet.from_pem(ca_a.pem() * 2, A).get(A) == (ca_a.cert,)


def test_bundle_ca_without_uri_needs_trust_domain() -> None:
    plain = make_ca("example.org", uri=None)
    with pytest.raises(BundleError, match="trust domain"):
        BundleSet.from_pem(plain.pem())
    with pytest.raises(BundleError):
        BundleSet.from_pem(make_ca("example.org", uri="spiffe://example.org/ca").pem())


def test_bundle_refuses_non_ca(ca_a: TestCA) -> None:
    leaf, _ = make_leaf(ca_a)
    with pytest.raises(BundleError, match="not a CA"):
        BundleSet.from_pem(pem(leaf), A)
    with pytest.raises(BundleError):
        BundleSet({A: [leaf]})


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"]
)
def test_bundle_garbage(data: bytes) -> None:
    with pytest.raises(BundleError):
        BundleSet.from_pem(data, A)


def test_bundle_invalid_trust_domain(ca_a: TestCA) -> None:
    with pytest.raises(BundleError):
        BundleSet.from_pem(ca_a.pem(), "Example.org")
    with pytest.raises(BundleError):
        BundleSet({"example.org/x": [ca_a.cert]})  # type: ignore[dict-item]


def test_bundle_from_file(tmp_path, ca_a: TestCA) -> None:
    p = tmp_path / "bundle.pem"
    p.write_bytes(ca_a.pem())
    assert BundleSet.from_file(p).get(A) == (ca_a.cert,)
    with pytest.raises(BundleError, match="cannot read"):
        BundleSet.from_file(tmp_path / "missing.pem")


def test_bundle_from_py_spiffe(ca_a: TestCA, ca_b: TestCA) -> None:
    import spiffe

    ps = spiffe.X509BundleSet.of(
        [
            spiffe.X509Bundle(spiffe.TrustDomain("example.org"), {ca_a.cert}),
            spiffe.X509Bundle(spiffe.TrustDomain("other.org"), {ca_b.cert}),
        ]
    )
    bs = BundleSet.from_py_spiffe(ps)
    assert bs.get(A) == (ca_a.cert,) and bs.get(B) == (ca_b.cert,)
    leaf, _ = make_leaf(ca_a)
    assert verify_svid(leaf.public_bytes(Encoding.PEM), bs).spiffe_id.trust_domain == A
