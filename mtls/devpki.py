"""A development PKI: a self-signed SPIFFE CA and X.509-SVIDs shaped like SPIRE's.

ECDSA P-256 everywhere (SPIRE's default; cryptography's X.509 verifier refuses
Ed25519 certificate keys). The CA carries no name constraints: cryptography's
verifier refuses URI name constraints. Private keys are written 0600, atomically.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtls.errors import MtlsError
from mtls.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

__all__ = [
    "DEV_SERVERS",
    "DEV_WORKLOADS",
    "DevCA",
    "DevPki",
    "DevPkiError",
    "DevPkiExistsError",
    "IssuedSvid",
    "dev_pki_files",
    "init_dev_pki",
    "load_dev_pki",
    "write_private_key",
]

DEV_WORKLOADS: dict[str, str] = {
    "issuer": "/axid/issuer",
    "payments": "/svc/payments",
    "planner": "/agent/planner",
    "worker": "/agent/worker",
}
# The servers among them: their SVIDs also name localhost and 127.0.0.1 (see issue_svid).
DEV_SERVERS: frozenset[str] = frozenset({"issuer", "payments"})

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
BUNDLE_FILE = "bundle.pem"

# Tolerate clocks of peers a little behind ours, as SPIRE does.
_BACKDATE = timedelta(minutes=1)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_PEM_BYTES = 1024 * 1024


class DevPkiError(MtlsError):
    """The dev PKI cannot be created, loaded or used as asked."""


class DevPkiExistsError(DevPkiError):
    """An output file exists and overwriting was not asked for."""


# -- files -------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a fresh temp file in the same directory + rename.

    The temp file is created O_EXCL with its final ``mode``, so a private key is never
    readable by others, not even between creation and rename.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # umask may have removed bits we want (never adds any)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_private_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, mode 0600, atomically."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(Path(path), pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)


def _read_limited(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise DevPkiError(f"{what} {path} does not exist (run `axid certs init`?)") from None
    except OSError as e:
        raise DevPkiError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > _MAX_PEM_BYTES:
        raise DevPkiError(f"{what} {path} is too large")
    return data


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# -- certificates ------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _as_td(td: TrustDomain | str) -> TrustDomain:
    return td if isinstance(td, TrustDomain) else TrustDomain.parse(td)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class IssuedSvid:
    """An X.509-SVID and its private key."""

    spiffe_id: SpiffeId
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first, root excluded

    def cert_pem(self) -> bytes:
        """Leaf (then any intermediates) as PEM."""
        return _pem(self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``PREFIX.pem`` (0644) and ``PREFIX.key`` (0600); returns both paths."""
        base = os.fspath(prefix)
        cert_path, key_path = Path(base + ".pem"), Path(base + ".key")
        # Key first: a cert on disk without its key is the lesser confusion.
        write_private_key(key_path, self.key)
        _write_public(cert_path, self.cert_pem())
        return cert_path, key_path

    def __repr__(self) -> str:  # never show the key
        return f"IssuedSvid(spiffe_id={self.spiffe_id}, serial={self.cert.serial_number:x})"


@dataclass(frozen=True)
class DevCA:
    """A self-signed SPIFFE CA for one trust domain."""

    trust_domain: TrustDomain
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain | str,
        *,
        ttl: timedelta = timedelta(days=365),
        now: datetime | None = None,
    ) -> DevCA:
        """A new CA: CA:TRUE pathlen 0, keyCertSign+cRLSign, URI SAN ``spiffe://<td>``."""
        td = _as_td(trust_domain)
        if ttl <= timedelta(0):
            raise DevPkiError("CA ttl must be positive")
        at = _utc(now)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"AXID dev CA {td.name}"[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(at - _BACKDATE)
            .not_valid_after(at + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id()))]),
                critical=False,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(td, cert, key)

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> DevCA:
        """Load a CA written by :meth:`write`; checks the key matches the certificate."""
        cert_path, key_path = Path(cert_path), Path(key_path)
        try:
            cert = x509.load_pem_x509_certificate(_read_limited(cert_path, "CA certificate"))
        except ValueError as e:
            raise DevPkiError(f"{cert_path} is not a PEM certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(
                _read_limited(key_path, "CA key"), password=None
            )
        except (ValueError, TypeError) as e:
            # Do not echo key material: the message from cryptography is generic.
            raise DevPkiError(f"{key_path} is not an unencrypted PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise DevPkiError(f"{key_path} is not an ECDSA P-256 key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise DevPkiError(f"{key_path} does not match the certificate {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError) as e:
            raise DevPkiError(f"{cert_path} is not a SPIFFE CA certificate: {e}") from e
        if not bc.ca:
            raise DevPkiError(f"{cert_path} is not a CA certificate")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise DevPkiError(f"{cert_path} must carry exactly one URI SAN spiffe://<td>")
        try:
            td = TrustDomain.parse(uris[0])
        except SpiffeIdError as e:
            raise DevPkiError(f"{cert_path} URI SAN is not a trust domain: {e}") from e
        return cls(td, cert, key)

    def issue_svid(
        self,
        spiffe_id: SpiffeId | str,
        *,
        ttl: timedelta = timedelta(hours=24),
        not_before: datetime | None = None,
        server_names: bool = False,
    ) -> IssuedSvid:
        """Issue an X.509-SVID for ``spiffe_id`` (must be in this CA's trust domain).

        ``not_before`` defaults to now minus one minute (clock skew); the SVID never
        outlives the CA. ``server_names`` adds ``DNS:localhost`` and
        ``IP:127.0.0.1`` SANs beside the one URI SAN (the X509-SVID spec allows
        other SAN types), so that ordinary HTTPS clients such as curl verify a
        loopback server; AXID's own clients still check the SPIFFE ID.
        """
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        if not sid.member_of(self.trust_domain):
            raise DevPkiError(f"{sid} is not in this CA's trust domain {self.trust_domain.name}")
        if not sid.path:
            raise DevPkiError(f"{sid} has no path: an X509-SVID names a workload")
        start, end = self._svid_window(ttl, not_before)
        key = _new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_svid_subject())
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # What SPIRE's X509-SVID template sets.
            .add_extension(_svid_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # Non-critical because the subject is not empty (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName(_svid_sans(sid, server_names)), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(self._aki(), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return IssuedSvid(sid, cert, key, (cert,))

    def _svid_window(
        self, ttl: timedelta, not_before: datetime | None
    ) -> tuple[datetime, datetime]:
        """An SVID's validity: from ``not_before`` (default: now, backdated for clock
        skew) for ``ttl``, never past the CA's own end."""
        if ttl <= timedelta(0):
            raise DevPkiError("SVID ttl must be positive")
        start = _utc(not_before) if not_before is not None else _utc(None) - _BACKDATE
        end = min(start + ttl, self.cert.not_valid_after_utc)
        if end <= start:
            raise DevPkiError("the CA expires before the SVID would start")
        return start, end

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ca.pem``, ``ca.key`` (0600) and ``bundle.pem`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_private_key(d / CA_KEY_FILE, self.key)
        _write_public(d / CA_CERT_FILE, self.cert_pem())
        _write_public(d / BUNDLE_FILE, self.cert_pem())

    def __repr__(self) -> str:  # never show the key
        return f"DevCA(trust_domain={self.trust_domain.name}, serial={self.cert.serial_number:x})"


def _svid_subject() -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
        ]
    )


def _svid_key_usage() -> x509.KeyUsage:
    """What SPIRE's X509-SVID template sets: signing and key exchange, no CA use."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _svid_sans(sid: SpiffeId, server_names: bool) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
    if server_names:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return sans


# -- the dev PKI directory ----------------------------------------------------------


@dataclass(frozen=True)
class DevPki:
    """A dev PKI directory: the CA, ``bundle.pem`` and one SVID per dev workload."""

    directory: Path
    trust_domain: TrustDomain
    ca: DevCA

    def cert(self, name: str) -> Path:
        """``DIR/<name>.pem``, e.g. ``cert("planner")``."""
        return self.directory / f"{_check_name(name)}.pem"

    def key(self, name: str) -> Path:
        """``DIR/<name>.key``."""
        return self.directory / f"{_check_name(name)}.key"

    @property
    def bundle(self) -> Path:
        return self.directory / BUNDLE_FILE

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY_FILE

    def spiffe_id(self, name: str) -> SpiffeId:
        """The SPIFFE ID of dev workload ``name`` (one of :data:`DEV_WORKLOADS`)."""
        try:
            path = DEV_WORKLOADS[name]
        except KeyError:
            raise DevPkiError(f"unknown dev workload {name!r}") from None
        return SpiffeId(self.trust_domain, path)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise DevPkiError(f"invalid file name {name!r}")
    return name


def dev_pki_files(directory: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Every file :func:`init_dev_pki` writes into ``directory``."""
    d = Path(directory)
    files = [d / CA_CERT_FILE, d / CA_KEY_FILE, d / BUNDLE_FILE]
    for name in DEV_WORKLOADS:
        files += [d / f"{name}.pem", d / f"{name}.key"]
    return tuple(files)


def init_dev_pki(
    directory: str | os.PathLike[str],
    trust_domain: str = "example.org",
    *,
    force: bool = False,
    svid_ttl: timedelta = timedelta(hours=24),
) -> DevPki:
    """Create a dev CA and an SVID for each of :data:`DEV_WORKLOADS` in ``directory``.

    Refuses (:class:`DevPkiExistsError`, nothing changed) if any output file exists,
    unless ``force``. An invalid trust domain raises ``SpiffeIdError``.
    """
    td = _as_td(trust_domain)
    if svid_ttl <= timedelta(0):
        raise DevPkiError("SVID ttl must be positive")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise DevPkiError(f"{d} exists and is not a directory")
    if not force:
        for f in dev_pki_files(d):
            if f.exists() or f.is_symlink():
                raise DevPkiExistsError(
                    f"{f} already exists; use --force to overwrite the dev PKI in {d}"
                )
    # Issue everything in memory first: a failure leaves the directory untouched.
    ca = DevCA.create(td)
    svids = {
        name: ca.issue_svid(
            SpiffeId(td, path), ttl=svid_ttl, server_names=name in DEV_SERVERS
        )
        for name, path in DEV_WORKLOADS.items()
    }
    d.mkdir(parents=True, exist_ok=True)
    ca.write(d)
    for name, svid in svids.items():
        svid.write(d / name)
    return DevPki(d, td, ca)


def load_dev_pki(directory: str | os.PathLike[str]) -> DevPki:
    """Load the dev PKI in ``directory`` (its CA; SVID files are read by their users)."""
    d = Path(directory)
    ca = DevCA.load(d / CA_CERT_FILE, d / CA_KEY_FILE)
    return DevPki(d, ca.trust_domain, ca)
