"""X.509-SVID verification (SPIFFE X509-SVID spec + RFC 5280 path validation).

:func:`verify_svid` accepts a presented chain only if

1. it parses (DER or PEM), leaf first;
2. the leaf meets the X509-SVID spec: exactly one URI SAN, a strictly valid SPIFFE ID
   with a non-empty path; not a CA; keyUsage present with digitalSignature and
   without keyCertSign / cRLSign;
3. the leaf is inside its validity window;
4. the chain verifies against the bundle of the leaf's *own* trust domain only
   (cryptography's client verifier), so a CA of trust domain B can never vouch for
   an ID in trust domain A.

Every failure is a :class:`NotAnSvidError` (reason ``peer_not_svid``) or an
:class:`UntrustedSvidError` (reason ``peer_untrusted``) with a stable ``rule``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, VerificationError

from mtls.errors import MtlsError
from mtls.spiffeid import SpiffeId, SpiffeIdError
from mtls.x509bundle import BundleSet

__all__ = [
    "MAX_CHAIN_LENGTH",
    "NotAnSvidError",
    "SvidError",
    "UntrustedSvidError",
    "VerifiedSvid",
    "load_chain",
    "verify_svid",
    "x5t_s256",
]

# A presented chain longer than this is refused before any signature work: SPIRE
# chains are leaf + a few intermediates, and the input may come from a header.
MAX_CHAIN_LENGTH = 16
_MAX_CHAIN_BYTES = 256 * 1024

_PEM_MARKER = b"-----BEGIN"

_E = TypeVar("_E", bound=x509.ExtensionType)

# What cryptography raises for certificates it parsed lazily but cannot fully decode.
_PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class SvidError(MtlsError):
    """An X.509-SVID was refused. Always one of the two subclasses.

    ``rule`` is a short stable name of the failed check; ``reason`` is the DESIGN.md
    reason code (``peer_not_svid`` or ``peer_untrusted``); ``detail`` is for humans.
    """

    reason: str = "peer_untrusted"
    rule: str
    detail: str

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{detail} [{rule}]")
        self.rule = rule
        self.detail = detail


class NotAnSvidError(SvidError):
    """The certificate is not an X.509-SVID (malformed, or breaks the X509-SVID spec)."""

    reason = "peer_not_svid"


class UntrustedSvidError(SvidError):
    """The SVID is well-formed but not trusted: unknown trust domain, outside its
    validity, or its chain does not verify against its trust domain's bundle."""

    reason = "peer_untrusted"


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    """A verified X.509-SVID."""

    spiffe_id: SpiffeId
    x5t_s256: str
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def x5t_s256(cert: x509.Certificate | bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (no padding) SHA-256 of the certificate DER."""
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    elif isinstance(cert, bytes | bytearray | memoryview):
        der = bytes(cert)
    else:
        raise TypeError(f"cert must be x509.Certificate or DER bytes, not {type(cert).__name__}")
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _to_bytes(item: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(item, str):
        try:
            return item.encode("ascii")
        except UnicodeEncodeError:
            raise NotAnSvidError("unparseable", "certificate text is not ASCII PEM") from None
    return bytes(item)


def _parse_blob(blob: bytes) -> list[x509.Certificate]:
    if len(blob) > _MAX_CHAIN_BYTES:
        raise UntrustedSvidError(
            "chain_too_long", f"certificate data is {len(blob)} bytes, over {_MAX_CHAIN_BYTES}"
        )
    try:
        if _PEM_MARKER in blob:
            return x509.load_pem_x509_certificates(blob)
        return [x509.load_der_x509_certificate(blob)]
    except ValueError as e:
        raise NotAnSvidError("unparseable", f"certificate cannot be parsed: {e}") from None


def load_chain(
    data: Sequence[bytes | str | x509.Certificate] | bytes | str,
) -> tuple[x509.Certificate, ...]:
    """Parse a presented chain, leaf first.

    ``data`` is one PEM blob (one or more certificates), one DER certificate, or a
    sequence whose items are certificates, DER or PEM. Raises :class:`NotAnSvidError`
    (``empty_chain`` / ``unparseable``) or :class:`UntrustedSvidError` (``chain_too_long``).
    """
    certs: list[x509.Certificate] = []
    if isinstance(data, bytes | bytearray | memoryview | str):
        raw = _to_bytes(data)
        if raw.strip():
            certs = _parse_blob(raw)
    elif isinstance(data, Sequence):
        if len(data) > MAX_CHAIN_LENGTH:
            raise UntrustedSvidError(
                "chain_too_long", f"chain has {len(data)} certificates, over {MAX_CHAIN_LENGTH}"
            )
        for item in data:
            if isinstance(item, x509.Certificate):
                certs.append(item)
            elif isinstance(item, bytes | bytearray | memoryview | str):
                certs.extend(_parse_blob(_to_bytes(item)))
            else:
                raise NotAnSvidError(
                    "unparseable", f"chain item of type {type(item).__name__} is not a certificate"
                )
    else:
        raise NotAnSvidError(
            "unparseable", f"chain of type {type(data).__name__} is not certificate data"
        )
    if not certs:
        raise NotAnSvidError("empty_chain", "no certificate was presented")
    if len(certs) > MAX_CHAIN_LENGTH:
        raise UntrustedSvidError(
            "chain_too_long", f"chain has {len(certs)} certificates, over {MAX_CHAIN_LENGTH}"
        )
    return tuple(certs)


def _extension(cert: x509.Certificate, cls: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    except _PARSE_ERRORS as e:  # malformed DER inside an extension, duplicate extensions
        raise NotAnSvidError("unparseable", f"leaf extensions cannot be parsed: {e}") from None


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    """The X509-SVID spec's leaf rules; returns the SPIFFE ID."""
    san = _extension(leaf, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    if len(uris) != 1:
        raise NotAnSvidError(
            "uri_san_count", f"leaf has {len(uris)} URI SANs; an X509-SVID has exactly one"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise NotAnSvidError("not_spiffe_uri", f"leaf URI SAN is not a SPIFFE ID: {e}") from None
    if not spiffe_id.path:
        raise NotAnSvidError(
            "empty_path", f"leaf SPIFFE ID {spiffe_id} has no path; a workload ID needs one"
        )

    # RFC 5280: an absent basicConstraints means cA=FALSE (go-spiffe agrees).
    bc = _extension(leaf, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise NotAnSvidError("leaf_is_ca", "leaf certificate is a CA (cA=TRUE)")

    ku = _extension(leaf, x509.KeyUsage)
    if ku is None:
        raise NotAnSvidError("no_key_usage", "leaf has no keyUsage extension")
    if ku.key_cert_sign:
        raise NotAnSvidError("key_cert_sign", "leaf keyUsage has keyCertSign")
    if ku.crl_sign:
        raise NotAnSvidError("crl_sign", "leaf keyUsage has cRLSign")
    if not ku.digital_signature:
        raise NotAnSvidError("no_digital_signature", "leaf keyUsage lacks digitalSignature")
    return spiffe_id


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    # Naive means UTC, as in cryptography's PolicyBuilder.time().
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def verify_svid(
    chain: Sequence[bytes | str | x509.Certificate] | bytes | str,
    bundles: BundleSet,
    *,
    now: datetime | None = None,
) -> VerifiedSvid:
    """Verify a presented X.509-SVID chain (leaf first) against ``bundles``.

    Raises :class:`NotAnSvidError` or :class:`UntrustedSvidError`; see the module doc.
    """
    if not isinstance(bundles, BundleSet):
        raise TypeError(f"bundles must be a BundleSet, not {type(bundles).__name__}")
    at = _utc(now)
    certs = load_chain(chain)
    leaf, intermediates = certs[0], list(certs[1:])
    spiffe_id = _check_leaf(leaf)

    store = bundles._store(spiffe_id.trust_domain)
    if store is None:
        raise UntrustedSvidError(
            "unknown_trust_domain", f"no trust bundle for trust domain {spiffe_id.trust_domain}"
        )

    # Checked before path validation only to name the failure precisely; the verifier
    # below checks every certificate's validity too.
    if at < leaf.not_valid_before_utc:
        raise UntrustedSvidError(
            "not_yet_valid",
            f"leaf is valid from {leaf.not_valid_before_utc.isoformat()}, now {at.isoformat()}",
        )
    if at > leaf.not_valid_after_utc:
        raise UntrustedSvidError(
            "expired",
            f"leaf expired at {leaf.not_valid_after_utc.isoformat()}, now {at.isoformat()}",
        )

    verifier = PolicyBuilder().store(store).time(at).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as e:
        raise UntrustedSvidError(
            "chain_invalid", f"chain does not verify against {spiffe_id.trust_domain}: {e}"
        ) from None
    except _PARSE_ERRORS as e:  # a malformed certificate met during path building
        raise UntrustedSvidError("chain_invalid", f"chain cannot be validated: {e}") from None

    return VerifiedSvid(
        spiffe_id=spiffe_id,
        x5t_s256=x5t_s256(leaf),
        leaf=leaf,
        chain=certs,
    )
