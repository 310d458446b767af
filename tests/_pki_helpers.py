"""A tiny certificate factory for tests, built on cryptography directly.

Unlike `mtls.devpki` it can build broken certificates on purpose: every knob defaults
to what a valid SPIRE-like X.509-SVID has, and a test changes exactly one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DEFAULT = object()


def now() -> datetime:
    return datetime.now(UTC)


def key_usage(
    *,
    digital_signature: bool = True,
    key_encipherment: bool = True,
    key_agreement: bool = True,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class TestCA:
    __test__ = False  # not a pytest class

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(
    trust_domain: str = "example.org",
    *,
    uri: str | object | None = _DEFAULT,
    issuer: TestCA | None = None,
    path_length: int | None = None,
    cn: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> TestCA:
    """A CA (self-signed, or an intermediate when ``issuer`` is given)."""
    key = ec.generate_private_key(ec.SECP256R1())
    t = now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, cn or f"test CA {trust_domain} {secrets.token_hex(4)}"
            ),
        ]
    )
    signer_key = issuer.key if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or t - timedelta(hours=1))
        .not_valid_after(not_after or t + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            key_usage(
                digital_signature=False,
                key_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    the_uri = f"spiffe://{trust_domain}" if uri is _DEFAULT else uri
    if the_uri is not None:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(the_uri))]),
            critical=False,
        )
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return TestCA(b.sign(signer_key, hashes.SHA256()), key)


def make_leaf(
    ca: TestCA | None,
    uris: Sequence[str] = ("spiffe://example.org/workload",),
    *,
    dns_names: Sequence[str] = (),
    basic_constraints: x509.BasicConstraints | object | None = _DEFAULT,
    ku: x509.KeyUsage | object | None = _DEFAULT,
    eku: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf signed by ``ca``; ``ca=None`` makes it self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    t = now()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    signer = ca.key if ca else key
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or t - timedelta(minutes=5))
        .not_valid_after(not_after or t + timedelta(hours=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    bc = (
        x509.BasicConstraints(ca=False, path_length=None)
        if basic_constraints is _DEFAULT
        else basic_constraints
    )
    if bc is not None:
        b = b.add_extension(bc, critical=True)
    k = key_usage() if ku is _DEFAULT else ku
    if k is not None:
        b = b.add_extension(k, critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(signer, hashes.SHA256()), key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
