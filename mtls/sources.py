"""Where a service gets its own X.509-SVID and trust bundles from.

Two sources, one protocol (:class:`X509Source`):

* :class:`FileSource` reads PEM files (cert chain, key, one or more bundle files) and
  reloads them when they change on disk, without a restart. A new set is adopted only
  if it is whole and valid: the key file is private (no group/other permission), the
  key matches the leaf and the leaf verifies as an X.509-SVID against the new bundles.
  Otherwise the previous good set keeps being served.
* :class:`WorkloadApiSource` follows the SPIFFE Workload API (``SPIFFE_ENDPOINT_SOCKET``)
  through py-spiffe's ``X509Source``; every pushed update is re-verified the same way.

Consumers (TLS contexts, the verifier) read ``generation`` to notice a change cheaply,
then ``svid()`` and ``bundles()``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mtls._files import FileStamp, file_stamps
from mtls.errors import MtlsError
from mtls.spiffeid import SpiffeId, TrustDomain
from mtls.x509bundle import BundleError, BundleSet
from mtls.x509svid import SvidError, verify_svid

if TYPE_CHECKING:
    import spiffe

__all__ = [
    "FileSource",
    "SourceError",
    "SvidMaterial",
    "WorkloadApiSource",
    "X509Source",
    "svid_material_from_pem",
]

_log = logging.getLogger(__name__)

# Cert/key/bundle files are a few KiB; refuse to slurp anything huge.
_MAX_FILE_BYTES = 4 * 1024 * 1024

_PathLike = str | os.PathLike[str]


class SourceError(MtlsError):
    """The SVID or bundle source cannot provide valid material."""


@dataclass(frozen=True)
class SvidMaterial:
    """A verified X.509-SVID with its private key, as PEM for TLS libraries."""

    spiffe_id: SpiffeId
    cert_chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes = field(repr=False)  # unencrypted PKCS8; never shown in repr or logs
    leaf: x509.Certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return tuple(x509.load_pem_x509_certificates(self.cert_chain_pem))


@runtime_checkable
class X509Source(Protocol):
    """What TLS contexts and the verifier consume."""

    def svid(self) -> SvidMaterial: ...

    def bundles(self) -> BundleSet: ...

    @property
    def generation(self) -> int:
        """Increases whenever ``svid()`` or ``bundles()`` change."""
        ...

    def close(self) -> None: ...


# -- building and checking material -------------------------------------------------


_PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _build_material(
    chain: tuple[x509.Certificate, ...] | list[x509.Certificate],
    key: object,
    bundles: BundleSet,
    *,
    now: datetime | None = None,
) -> SvidMaterial:
    if not isinstance(key, _PrivateKey):
        raise SourceError(f"unsupported private key type {type(key).__name__}")
    try:
        verified = verify_svid(list(chain), bundles, now=now)
    except SvidError as e:
        raise SourceError(f"certificate is not a valid X.509-SVID for the bundle: {e}") from e
    # A key that does not match the leaf would fail every handshake: refuse it here.
    if _public_der(key.public_key()) != _public_der(verified.leaf.public_key()):
        raise SourceError("private key does not match the SVID certificate")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in verified.chain)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SvidMaterial(verified.spiffe_id, chain_pem, key_pem, verified.leaf)


def _load_key(key_pem: bytes) -> object:
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # cryptography's message is generic; never echo key bytes.
        raise SourceError("key is not an unencrypted PEM private key") from None


def _load_certs(cert_pem: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise SourceError("certificate file holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise SourceError(f"certificate PEM cannot be parsed: {e}") from None


def svid_material_from_pem(
    cert_chain_pem: bytes,
    key_pem: bytes,
    bundles: BundleSet,
    *,
    now: datetime | None = None,
) -> SvidMaterial:
    """Check and package a PEM cert chain (leaf first) and key against ``bundles``.

    Raises :class:`SourceError` unless the chain verifies as an X.509-SVID against
    ``bundles`` and the key matches its leaf.
    """
    return _build_material(_load_certs(cert_chain_pem), _load_key(key_pem), bundles, now=now)


def _same(a: tuple[SvidMaterial, BundleSet], b: tuple[SvidMaterial, BundleSet]) -> bool:
    """Same SVID, key and bundles."""
    return (
        a[0].cert_chain_pem == b[0].cert_chain_pem
        and hmac.compare_digest(a[0].key_pem, b[0].key_pem)
        and a[1] == b[1]
    )


# -- FileSource ---------------------------------------------------------------------


def _read(path: Path, what: str, *, private: bool = False) -> bytes:
    """A file's bytes; with ``private``, refused unless only its owner may access it."""
    try:
        with path.open("rb") as f:
            if private:
                # Of the opened file (symlinks followed: Kubernetes mounts are symlinks).
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise SourceError(
                        f"{what} {path} is accessible by group/others (mode "
                        f"{stat.S_IMODE(mode):04o}): a private key must be 0600 or 0400"
                    )
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SourceError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise SourceError(f"{what} {path} is larger than {_MAX_FILE_BYTES} bytes")
    return data


_Stamp = tuple[FileStamp, ...]


class FileSource:
    """SVID and bundle from PEM files, reloaded on change without a restart.

    ``bundle`` is one PEM file or a non-empty sequence of them (their CAs are merged,
    per trust domain). ``key`` must not be accessible by group or others (0600 or
    0400), else :class:`SourceError`.

    On access (at most every ``min_check_interval`` seconds) the files'
    ``(mtime_ns, size, inode)`` are compared with the loaded set; on a change all of
    them are re-read and re-validated. A set that does not validate (e.g. half-written, or
    cert replaced before key) is not adopted: the previous good set is served and a
    warning is logged once per bad set. Replace files atomically (``os.replace``)
    where you can; the check makes non-atomic writers safe, not instant.

    The first load must succeed, else :class:`SourceError`.
    """

    def __init__(
        self,
        cert: _PathLike,
        key: _PathLike,
        bundle: _PathLike | Sequence[_PathLike],
        *,
        trust_domain: TrustDomain | str | None = None,
        min_check_interval: float = 1.0,
    ) -> None:
        if min_check_interval < 0:
            raise ValueError("min_check_interval must be >= 0")
        bundles = (bundle,) if isinstance(bundle, str | os.PathLike) else tuple(bundle)
        if not bundles:
            raise ValueError("at least one bundle file is needed")
        # cert, key, then the bundle files.
        self._paths = (Path(cert), Path(key), *(Path(b) for b in bundles))
        self._trust_domain = trust_domain
        self._interval = float(min_check_interval)
        self._lock = threading.Lock()
        self._closed = False
        self._generation = 0
        self._failed_stamp: _Stamp | None = None
        stamp = self._stamp()
        if stamp is None:
            missing = ", ".join(str(p) for p in self._paths if not p.exists())
            raise SourceError(f"cannot stat SVID files: {missing or 'unreadable'}")
        self._material, self._bundles = self._load()
        self._stamp_loaded = stamp
        self._last_check = time.monotonic()

    def _stamp(self) -> _Stamp | None:
        stamps = file_stamps(self._paths)
        return None if None in stamps else stamps  # type: ignore[return-value]  # no None left

    def _load(self) -> tuple[SvidMaterial, BundleSet]:
        cert_p, key_p, *bundle_ps = self._paths
        cert_pem = _read(cert_p, "certificate")
        key_pem = _read(key_p, "key", private=True)
        merged: dict[TrustDomain, list[x509.Certificate]] = {}
        for bundle_p in bundle_ps:
            try:
                loaded = BundleSet.from_pem(_read(bundle_p, "bundle"), self._trust_domain)
            except BundleError as e:
                raise SourceError(f"bundle {bundle_p}: {e}") from None
            for td in loaded:
                merged.setdefault(td, []).extend(loaded.get(td))
        try:
            bundles = BundleSet(merged)
        except BundleError as e:
            raise SourceError(f"bundles {', '.join(map(str, bundle_ps))}: {e}") from None
        try:
            material = svid_material_from_pem(cert_pem, key_pem, bundles)
        except SourceError as e:
            raise SourceError(f"{cert_p} / {key_p}: {e}") from None
        return material, bundles

    def _maybe_reload(self) -> None:
        if self._closed:
            raise SourceError("source is closed")
        now = time.monotonic()
        if now - self._last_check < self._interval:
            return
        # Never make a handshake wait on another thread's reload: serve the current set.
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last_check = now
            stamp = self._stamp()
            if stamp is None or stamp == self._stamp_loaded or stamp == self._failed_stamp:
                # A missing file mid-rotation: keep serving, look again next time.
                return
            try:
                material, bundles = self._load()
            except SourceError as e:
                self._failed_stamp = stamp
                _log.warning("SVID files changed but are not valid; keeping previous: %s", e)
                return
            # If the files moved again while we read, the next check sees a new stamp.
            self._stamp_loaded = stamp
            self._failed_stamp = None
            if _same((self._material, self._bundles), (material, bundles)):
                return  # rewritten with the same content: nothing to rotate
            self._material, self._bundles = material, bundles
            self._generation += 1
            _log.info(
                "reloaded SVID %s (serial %x) from files",
                material.spiffe_id,
                material.leaf.serial_number,
            )
        finally:
            self._lock.release()

    def svid(self) -> SvidMaterial:
        self._maybe_reload()
        return self._material

    def bundles(self) -> BundleSet:
        self._maybe_reload()
        return self._bundles

    @property
    def generation(self) -> int:
        self._maybe_reload()
        return self._generation

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cert_p, key_p, *bundle_ps = self._paths
        bundle = bundle_ps[0] if len(bundle_ps) == 1 else [str(b) for b in bundle_ps]
        return f"FileSource(cert={cert_p}, key={key_p}, bundle={bundle})"


# -- WorkloadApiSource --------------------------------------------------------------


def _endpoint(socket_path: str | os.PathLike[str] | None) -> str:
    """``unix:///abs/path`` from a path, a ``unix:`` URI or ``SPIFFE_ENDPOINT_SOCKET``."""
    raw = os.environ.get("SPIFFE_ENDPOINT_SOCKET") if socket_path is None else socket_path
    if raw is None or raw == "":
        raise SourceError("no Workload API socket given and SPIFFE_ENDPOINT_SOCKET is not set")
    value = os.fspath(raw)
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if path.startswith("//"):
            # unix://host/path is not a socket path: the authority must be empty.
            rest = path[2:]
            if not rest.startswith("/"):
                raise SourceError(f"Workload API socket {value!r}: authority is not allowed")
            path = rest
        if not path.startswith("/"):
            raise SourceError(f"Workload API socket {value!r}: path must be absolute")
    elif "://" in value:
        raise SourceError(f"Workload API socket {value!r}: only unix sockets are supported")
    else:
        path = os.path.abspath(value)
    if any(c in path for c in "?#"):
        raise SourceError(f"Workload API socket {value!r}: query or fragment is not allowed")
    return "unix://" + path


def _material_from_context(
    ctx: spiffe.workloadapi.x509_context.X509Context,
) -> tuple[SvidMaterial, BundleSet]:
    try:
        bundles = BundleSet.from_py_spiffe(ctx.x509_bundle_set)
    except BundleError as e:
        raise SourceError(f"Workload API bundle is not valid: {e}") from None
    svid = ctx.default_svid
    if svid is None:
        raise SourceError("Workload API returned no X.509-SVID")
    return _build_material(list(svid.cert_chain), svid.private_key, bundles), bundles


class WorkloadApiSource:
    """SVID and bundles from the SPIFFE Workload API (py-spiffe's ``X509Source``).

    ``socket_path`` is ``unix:///path`` or a filesystem path; ``None`` reads
    ``SPIFFE_ENDPOINT_SOCKET``. Blocks up to ``timeout`` seconds for the first update.
    Each update is verified (SVID against its bundle, key against leaf) before it is
    adopted; an invalid update is logged and ignored, the previous one kept.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0):
        import spiffe  # imported here: it pulls in grpc, which only this source needs

        self._endpoint = _endpoint(socket_path)
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = False
        self._current: tuple[SvidMaterial, BundleSet] | None = None
        try:
            self._source = spiffe.X509Source(socket_path=self._endpoint, timeout_in_seconds=timeout)
        except Exception as e:  # py-spiffe raises ArgumentError, X509SourceError, grpc errors
            raise SourceError(f"Workload API at {self._endpoint}: {e}") from None
        try:
            self._source.subscribe_for_updates(self._on_update)
            first = _material_from_context(self._source.get_x509_context())
            with self._lock:
                # An update may have raced in through the subscription: it is newer.
                if self._current is None:
                    self._current = first
        except Exception as e:
            self._source.close()
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"Workload API at {self._endpoint}: {e}") from None

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _on_update(self) -> None:
        # Runs on py-spiffe's watcher thread; must not raise.
        try:
            new = _material_from_context(self._source.get_x509_context())
        except Exception as e:
            _log.warning("ignoring invalid Workload API update: %s", e)
            return
        with self._lock:
            if self._current is None:  # first value, still inside __init__
                self._current = new
                return
            if _same(self._current, new):
                return
            self._current = new
            self._generation += 1
        _log.info(
            "Workload API rotated SVID %s (serial %x)",
            new[0].spiffe_id,
            new[0].leaf.serial_number,
        )

    def _get(self) -> tuple[SvidMaterial, BundleSet]:
        with self._lock:
            if self._closed:
                raise SourceError("source is closed")
            if self._current is None:
                raise SourceError("Workload API source has no SVID")
            return self._current

    def svid(self) -> SvidMaterial:
        return self._get()[0]

    def bundles(self) -> BundleSet:
        return self._get()[1]

    @property
    def generation(self) -> int:
        with self._lock:
            if self._closed:
                raise SourceError("source is closed")
            return self._generation

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self._source.unsubscribe_for_updates(self._on_update)
        self._source.close()

    def __enter__(self) -> WorkloadApiSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WorkloadApiSource({self._endpoint})"
