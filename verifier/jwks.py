"""The issuer's verification keys, as an in-memory :class:`~axid.keys.KeySet`.

Three sources, one small interface (``key_set()``, ``refresh_for_unknown_kid()``,
``start()``, ``close()``):

* :class:`StaticJwks`: a fixed key set (code, tests).
* :class:`FileJwks`: a JWKS file, re-read when it changes on disk.
* :class:`HttpJwks`: the issuer's ``/.well-known/jwks.json`` over mTLS, cached for
  ``cache_ttl`` (shorter than the issuer's publish lead, so a rotated key is known
  before it signs anything) and refetched early when a token names an unknown
  ``kid``, at most once per ``refetch_min_interval`` (an attacker sending random
  kids cannot make the verifier hammer the issuer). A fetch that fails keeps the
  last good set; a set older than ``max_stale`` is not used at all
  (``key_set()`` returns ``None``, and the pipeline answers 503 ``jwks_unavailable``).

A new document with the same kids keeps the same ``KeySet`` object, so caches tied
to it (the verified-token cache, ``KeySet``'s header cache) stay warm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import httpx

from axid.keys import KeyringError, KeySet
from mtls._files import FileStamp, file_stamp
from verifier._poller import Poller, get_capped
from verifier.errors import VerifierError

__all__ = [
    "MAX_JWKS_BYTES",
    "FileJwks",
    "HttpJwks",
    "JwksError",
    "JwksSource",
    "StaticJwks",
]

_log = logging.getLogger(__name__)

MAX_JWKS_BYTES: Final = 256 * 1024
_MIN_RETRY: Final = 1.0
_MAX_RETRY: Final = 30.0


class JwksError(VerifierError):
    """A JWKS could not be fetched or loaded."""


@runtime_checkable
class JwksSource(Protocol):
    def key_set(self) -> KeySet | None:
        """The current key set, or ``None`` if there is none fresh enough to use."""
        ...

    async def refresh_for_unknown_kid(self) -> bool:
        """Try to load a newer set (rate limited). True if the set changed."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _same(a: KeySet | None, b: KeySet) -> bool:
    # kid = RFC 7638 thumbprint of the key, so equal kid sets are equal key sets.
    return a is not None and set(a.kids) == set(b.kids)


class StaticJwks:
    """A fixed key set."""

    def __init__(self, keys: KeySet) -> None:
        if not isinstance(keys, KeySet):
            raise TypeError("keys must be an axid.keys.KeySet")
        self._keys = keys

    def key_set(self) -> KeySet:
        return self._keys

    async def refresh_for_unknown_kid(self) -> bool:
        return False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FileJwks:
    """A JWKS file, re-read (at most every ``check_interval`` s) when its stat changes.

    The first load must succeed (:class:`JwksError`); later a file that does not
    load (half-written, corrupt) is reported once and the previous set kept.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        refetch_min_interval: float = 30.0,
        check_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._refetch_min = refetch_min_interval
        self._check_interval = check_interval
        self._monotonic = monotonic
        self._keys: KeySet | None = None
        self._stamp: FileStamp | None = None
        self._bad_stamp: FileStamp | None = None
        self._checked_at = -float("inf")
        self._forced_at = -float("inf")
        self.loads = 0

    def _stat(self) -> FileStamp | None:
        return file_stamp(self._path)

    def _load(self) -> KeySet:
        try:
            with self._path.open("rb") as handle:
                data = handle.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise JwksError(f"cannot read {self._path}: {exc.strerror or exc}") from None
        try:
            return KeySet.from_jwks(data)
        except KeyringError as exc:
            raise JwksError(f"{self._path}: {exc}") from None

    def _check(self) -> bool:
        """Reload if the file changed; True if the key set changed."""
        self._checked_at = self._monotonic()
        stamp = self._stat()
        if stamp is None or stamp == self._stamp or stamp == self._bad_stamp:
            return False
        try:
            keys = self._load()
        except JwksError as exc:
            self._bad_stamp = stamp
            _log.warning("JWKS file changed but does not load; keeping the previous keys: %s", exc)
            return False
        self._stamp, self._bad_stamp = stamp, None
        self.loads += 1
        if _same(self._keys, keys):
            return False
        self._keys = keys
        return True

    def key_set(self) -> KeySet | None:
        if self._monotonic() - self._checked_at >= self._check_interval:
            self._check()
        return self._keys

    async def refresh_for_unknown_kid(self) -> bool:
        now = self._monotonic()
        if now - self._forced_at < self._refetch_min:
            return False
        self._forced_at = now
        return self._check()

    async def start(self) -> None:
        self._stamp = self._stat()
        self._keys = self._load()
        self._checked_at = self._monotonic()
        self.loads += 1

    async def close(self) -> None:
        return None


class HttpJwks:
    """The issuer's JWKS over an (mTLS) ``httpx.AsyncClient``; see the module docstring.

    The client is the caller's (it carries the TLS context) and is not closed here.
    """

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        cache_ttl: float = 300.0,
        refetch_min_interval: float = 30.0,
        max_stale: float = 3600.0,
        timeout: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._client = client
        self._ttl = cache_ttl
        self._refetch_min = refetch_min_interval
        self._max_stale = max_stale
        self._timeout = timeout
        self._monotonic = monotonic
        self._keys: KeySet | None = None
        self._fetched_at = -float("inf")  # last success
        self._attempted_at = -float("inf")  # last attempt (for the unknown-kid rate limit)
        self._failures = 0
        self._lock = asyncio.Lock()
        self._poller = Poller(
            self.refresh,
            self._next_delay,
            name="axid-jwks",
            log=_log,
            crash_message="JWKS refresher failed",
            on_crash=self._crashed,
        )
        self.fetches = 0
        self.last_error: str | None = None

    def key_set(self) -> KeySet | None:
        if self._keys is None or self._monotonic() - self._fetched_at > self._max_stale:
            return None
        return self._keys

    @property
    def age(self) -> float:
        """Seconds since the last successful fetch (inf before the first)."""
        return self._monotonic() - self._fetched_at

    async def refresh_for_unknown_kid(self) -> bool:
        if self._monotonic() - self._attempted_at < self._refetch_min:
            return False
        return await self.refresh()

    async def refresh(self) -> bool:
        """Fetch now (one fetch at a time; waiters share its result). True if changed."""
        before = self._keys
        asked = self._monotonic()
        async with self._lock:
            if self._attempted_at >= asked:  # a fetch started after we asked: use it
                return self._keys is not before
            self._attempted_at = self._monotonic()
            self.fetches += 1
            try:
                keys = await self._fetch()
            except (JwksError, httpx.HTTPError) as exc:
                self._failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                _log.warning("JWKS fetch from %s failed: %s", self._url, self.last_error)
                return False
            self._failures = 0
            self.last_error = None
            self._fetched_at = self._monotonic()
            if _same(self._keys, keys):
                return False
            self._keys = keys
            _log.info("JWKS from %s: kids %s", self._url, sorted(keys.kids))
            return True

    async def _fetch(self) -> KeySet:
        body = await get_capped(
            self._client,
            self._url,
            timeout=self._timeout,
            max_bytes=MAX_JWKS_BYTES,
            error=JwksError,
            too_large=f"JWKS larger than {MAX_JWKS_BYTES} bytes",
        )
        try:
            return KeySet.from_jwks(body)
        except KeyringError as exc:
            raise JwksError(str(exc)) from None

    def _next_delay(self) -> float:
        if self._failures:
            return min(self._ttl, _MAX_RETRY, _MIN_RETRY * 2 ** min(self._failures - 1, 10))
        return max(0.0, self._fetched_at + self._ttl - self._monotonic())

    def _crashed(self) -> None:
        self._failures += 1

    async def start(self) -> None:
        """First fetch (its failure is logged, not raised), then refresh in the background."""
        await self.refresh()
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()
