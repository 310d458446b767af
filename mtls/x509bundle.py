"""X.509 trust bundles, one per SPIFFE trust domain (SPIFFE Trust Domain and Bundle spec).

A :class:`BundleSet` is immutable: a verifier built from it can be shared between
threads and requests. Each certificate in a bundle must be a CA (basicConstraints
``cA=TRUE``): a bundle holds X.509 authorities, never workload certificates.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Store

from mtls.errors import MtlsError
from mtls.spiffeid import SpiffeIdError, TrustDomain

if TYPE_CHECKING:
    import spiffe

__all__ = ["BundleError", "BundleSet"]

# A bundle file is a handful of CA certificates; anything far larger is a mistake or
# an attack on the parser.
_MAX_BUNDLE_BYTES = 4 * 1024 * 1024

# What cryptography raises for certificates it parsed lazily but cannot fully decode.
_PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class BundleError(MtlsError, ValueError):
    """A trust bundle cannot be loaded or is not a valid set of X.509 authorities."""


def _as_trust_domain(td: TrustDomain | str) -> TrustDomain:
    if isinstance(td, TrustDomain):
        return td
    if isinstance(td, str):
        try:
            return TrustDomain.parse(td)
        except SpiffeIdError as e:
            raise BundleError(f"invalid trust domain: {e}") from e
    raise BundleError(f"trust domain must be TrustDomain or str, not {type(td).__name__}")


def _describe(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
    except _PARSE_ERRORS:
        return f"serial {cert.serial_number:x}"


def _check_authority(cert: object) -> x509.Certificate:
    if not isinstance(cert, x509.Certificate):
        raise BundleError(f"bundle entries must be x509.Certificate, not {type(cert).__name__}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BundleError(
            f"bundle certificate {_describe(cert)} has no basicConstraints: not a CA"
        ) from None
    except _PARSE_ERRORS as e:
        raise BundleError(f"bundle certificate {_describe(cert)} is malformed: {e}") from e
    if not bc.ca:
        raise BundleError(f"bundle certificate {_describe(cert)} is not a CA (cA=FALSE)")
    return cert


def _trust_domain_of_ca(cert: x509.Certificate) -> TrustDomain:
    """The trust domain named by a CA's URI SAN ``spiffe://<td>`` (as SPIRE CAs carry)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BundleError(
            f"CA {_describe(cert)} has no URI SAN naming its trust domain; "
            "give the trust domain explicitly"
        ) from None
    except _PARSE_ERRORS as e:
        raise BundleError(f"CA {_describe(cert)} is malformed: {e}") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe_uris = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe_uris) != 1:
        raise BundleError(
            f"CA {_describe(cert)} has {len(spiffe_uris)} spiffe:// URI SANs, need exactly "
            "one naming its trust domain; give the trust domain explicitly"
        )
    uri = spiffe_uris[0]
    try:
        td = TrustDomain.parse(uri)
    except SpiffeIdError as e:
        raise BundleError(f"CA {_describe(cert)} URI SAN is not a trust domain ID: {e}") from e
    return td


def _dedupe(certs: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return tuple(out)


def _load_pem_certs(data: bytes) -> list[x509.Certificate]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BundleError(f"bundle data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > _MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is {len(data)} bytes, more than {_MAX_BUNDLE_BYTES}")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise BundleError("bundle holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise BundleError(f"bundle PEM cannot be parsed: {e}") from e


class BundleSet:
    """Trust bundles (CA certificates) keyed by trust domain. Immutable."""

    __slots__ = ("_bundles", "_stores")

    _bundles: Mapping[TrustDomain, tuple[x509.Certificate, ...]]
    _stores: dict[TrustDomain, Store]

    def __init__(self, bundles: Mapping[TrustDomain, Sequence[x509.Certificate]]) -> None:
        if not isinstance(bundles, Mapping):
            raise BundleError(f"bundles must be a mapping, not {type(bundles).__name__}")
        built: dict[TrustDomain, tuple[x509.Certificate, ...]] = {}
        for key, certs in bundles.items():
            td = _as_trust_domain(key)
            if isinstance(certs, x509.Certificate | str | bytes):
                raise BundleError(f"bundle of {td} must be a sequence of certificates")
            checked = _dedupe([_check_authority(c) for c in certs])
            if not checked:
                raise BundleError(f"bundle of {td} is empty")
            if td in built:
                checked = _dedupe(built[td] + checked)
            built[td] = checked
        self._bundles = MappingProxyType(dict(sorted(built.items(), key=lambda kv: kv[0].name)))
        # Stores are built on first use and cached: building one per request is waste.
        self._stores = {}

    @classmethod
    def from_pem(cls, data: bytes, trust_domain: TrustDomain | str | None = None) -> BundleSet:
        """Load PEM CA certificates.

        With ``trust_domain``, all of them form that trust domain's bundle. Without,
        each CA is assigned to the trust domain named by its URI SAN ``spiffe://<td>``
        (SPIRE CA certificates carry one); a CA without one is a :class:`BundleError`.
        """
        certs = _load_pem_certs(data)
        if trust_domain is not None:
            return cls({_as_trust_domain(trust_domain): certs})
        grouped: dict[TrustDomain, list[x509.Certificate]] = {}
        for cert in certs:
            _check_authority(cert)
            grouped.setdefault(_trust_domain_of_ca(cert), []).append(cert)
        return cls(grouped)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], trust_domain: TrustDomain | str | None = None
    ) -> BundleSet:
        """Load a PEM bundle file; see :meth:`from_pem`."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                data = f.read(_MAX_BUNDLE_BYTES + 1)
        except OSError as e:
            raise BundleError(f"cannot read bundle {p}: {e.strerror or e}") from e
        try:
            return cls.from_pem(data, trust_domain)
        except BundleError as e:
            raise BundleError(f"{p}: {e}") from e

    @classmethod
    def from_py_spiffe(cls, bundle_set: spiffe.X509BundleSet) -> BundleSet:
        """Convert py-spiffe's ``X509BundleSet`` (e.g. from the Workload API).

        py-spiffe lowercases trust domain names; they are re-checked strictly here.
        """
        grouped: dict[TrustDomain, list[x509.Certificate]] = {}
        for bundle in bundle_set.bundles:
            td = _as_trust_domain(str(bundle.trust_domain.name))
            # x509_authorities is a set: sort for a deterministic order.
            certs = sorted(
                bundle.x509_authorities,
                key=lambda c: c.public_bytes(serialization.Encoding.DER),
            )
            grouped.setdefault(td, []).extend(certs)
        return cls(grouped)

    def get(self, td: TrustDomain) -> tuple[x509.Certificate, ...]:
        """The CA certificates of ``td``; ``()`` if the trust domain is unknown."""
        if not isinstance(td, TrustDomain):
            td = _as_trust_domain(td)
        return self._bundles.get(td, ())

    def _store(self, td: TrustDomain) -> Store | None:
        """A cryptography ``Store`` over ``td``'s bundle only (None if unknown)."""
        store = self._stores.get(td)
        if store is None:
            certs = self._bundles.get(td)
            if not certs:
                return None
            store = Store(list(certs))
            self._stores[td] = store
        return store

    @property
    def trust_domains(self) -> frozenset[TrustDomain]:
        return frozenset(self._bundles)

    def all_certificates(self) -> tuple[x509.Certificate, ...]:
        """Every CA certificate, trust domains in name order."""
        return tuple(c for certs in self._bundles.values() for c in certs)

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.all_certificates())

    def __contains__(self, td: object) -> bool:
        return td in self._bundles

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleSet):
            return NotImplemented
        return dict(self._bundles) == dict(other._bundles)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = ", ".join(f"{td.name}: {len(c)} CA" for td, c in self._bundles.items())
        return f"BundleSet({{{parts}}})"
