"""The verifier's resources, opened together and closed together.

::

    async with Runtime.open(config) as rt:
        decision = await rt.pipeline.decide(presented, rule)   # steps 1-7
        receipt = await rt.log.append(fields)                  # step 8

:class:`Runtime` opens, in this order, and closes in reverse (a part that fails to
close is logged and the rest still close; a failure while opening closes what was
opened and raises):

1. the trust bundles for peer SVIDs (bundle files, or the Workload API), and this
   service's own SVID when it calls the issuer over mTLS (``config.source`` instead,
   when given in code);
2. the decision log, with its witnesses (first: without it nothing may be allowed);
3. the single-use store, when a route rule is ``single_use``, and a task purging its
   expired jtis;
4. the mTLS client to the issuer, when the keys or the revocations come from it;
5. the issuer's keys (JWKS) and the revocations, each a source started here;
6. the pipeline (steps 1-7) over all of them.

:class:`LazyRuntime` holds the one runtime of an
:class:`~verifier.middleware.AxidVerifier`: opened on ASGI lifespan startup
(:meth:`~LazyRuntime.start`) or, without a lifespan, by the first request
(:meth:`~LazyRuntime.get`): once, under a lock. If that fails, the request is
refused, and so is every request until the next attempt, which a later request makes
after a backoff (1 s, doubling up to 30 s). The traceback is logged once per outage;
later failed attempts log one line each. One instance serves one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

import httpx

from axid.audit.log import DecisionLog
from mtls.sources import FileSource, WorkloadApiSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from verifier.approval import ApprovalFiler
from verifier.config import JwksConfig, RevocationConfig, VerifierConfig
from verifier.errors import VerifierError
from verifier.identity import BundleFiles, PeerResolver
from verifier.jwks import FileJwks, HttpJwks, JwksSource, StaticJwks
from verifier.pipeline import Pipeline
from verifier.replay import ReplayGuard
from verifier.revocation import DatabaseRevocationSource, IssuerRevocationPoller, RevocationSource

__all__ = ["LazyRuntime", "Runtime", "StartBackoff"]

_log = logging.getLogger(__name__)

_START_BACKOFF_MIN: Final = 1.0
_START_BACKOFF_MAX: Final = 30.0
_PURGE_EVERY: Final = 600.0
_PURGE_MARGIN: Final = 3600
_ISSUER_PATH: Final = "/axid/issuer"


class Runtime:
    """Every resource one verifier config needs, open (see the module docstring).

    ``async with Runtime.open(config) as rt`` opens them; the attributes are set
    from then until the block ends. ``clock`` (Unix seconds) overrides
    ``config.clock`` for token times and the single-use store's purge.
    """

    pipeline: Pipeline
    log: DecisionLog
    jwks: JwksSource
    revocations: RevocationSource
    replay: ReplayGuard | None

    def __init__(self, config: VerifierConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock or config.clock
        self.replay = None
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    def open(cls, config: VerifierConfig, *, clock: Callable[[], float] | None = None) -> Runtime:
        """The runtime of ``config``, opened by ``async with``."""
        return cls(config, clock=clock)

    async def __aenter__(self) -> Runtime:
        try:
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        if self.config.trusted_proxies.has_networks:
            _log.warning(
                "trusted_proxies names IP networks: they are matched only against the "
                "socket peer that mtls.uvicorn's protocol classes record (serve with "
                "--http mtls.uvicorn:H11TLSProtocol, also for plain TCP); under any other "
                "server x-forwarded-client-cert from them is ignored"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _open(self) -> None:
        config = self.config
        bundles, own_svid = await self._identity()
        # The decision log first: without it nothing may be allowed anyway.
        self.log = await DecisionLog.open(
            config.log.url,
            log=config.log_name,
            origin=config.log.origin,
            key=config.log.key,
            create_key=config.log.create_key,
            max_batch=config.log.max_batch,
            max_delay=config.log.max_delay,
            lock_timeout=config.log.lock_timeout,
            head=config.log.head,
            head_required=config.log.head_required,
            witnesses=config.log.witnesses,
            quorum=config.log.quorum,
            witness_mode=config.log.witness_mode,
            witness_timeout=config.log.witness_timeout,
        )
        self._closing(self.log.close)
        if config.rule_set.has_single_use or config.rule_set.has_approval:
            self.replay = await asyncio.to_thread(
                ReplayGuard.open,
                config.replay_url,
                service=config.service,
                lock_timeout=config.replay.lock_timeout,
            )
            self._closing(_in_thread(self.replay.close))
        client = None
        if _calls_issuer(config):
            client = _issuer_client(config, own_svid)
            self._closing(client.aclose)
        self.jwks = _jwks_source(config.jwks, client)
        await self.jwks.start()
        self._closing(self.jwks.close)
        self.revocations = _revocation_source(config.revocations, client)
        await self.revocations.start()
        self._closing(self.revocations.close)
        approvals = None
        if config.approvals is not None and client is not None:  # files approval requests
            approvals = ApprovalFiler(
                client, config.approvals.url, timeout=config.approvals.timeout
            )
        self.pipeline = Pipeline(
            config=config,
            peers=PeerResolver(bundles, config.trusted_proxies),
            jwks=self.jwks,
            revocations=self.revocations,
            replay=self.replay,
            clock=self.clock,
            approvals=approvals,
        )
        if self.replay is not None:
            purge = _purge_loop(self.replay, self.clock)
            task = asyncio.get_running_loop().create_task(purge, name="axid-replay-purge")
            self._closing(_cancelling(task))

    async def _identity(self) -> tuple[Callable[[], Any], Any]:
        """(the peer trust bundles' getter, this service's own SVID source or None)."""
        config = self.config
        if config.source is not None:
            own = config.source if hasattr(config.source, "svid") else None
            return config.source.bundles, own
        ident = config.identity
        assert ident is not None  # checked by the config
        if ident.workload_api is not None:
            source = await asyncio.to_thread(WorkloadApiSource, ident.workload_api)
            self._closing(_in_thread(source.close))
            return source.bundles, source
        files = await asyncio.to_thread(BundleFiles, ident.bundle)
        if ident.cert is None or ident.key is None:
            return files.bundles, None
        own_svid = await asyncio.to_thread(FileSource, ident.cert, ident.key, ident.bundle)
        self._closing(_in_thread(own_svid.close))
        return files.bundles, own_svid

    def _closing(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Close with the runtime; a failure to close one part does not stop the rest."""

        async def quietly() -> None:
            try:
                await close()
            except Exception:
                _log.warning("error while closing the verifier", exc_info=True)

        self._stack.push_async_callback(quietly)


class StartBackoff(VerifierError):
    """Starting failed recently; the next attempt is not due yet."""


class LazyRuntime:
    """The one :class:`Runtime` of a verifier, started by the ASGI lifespan or lazily
    by the first request (see the module docstring)."""

    def __init__(self, config: VerifierConfig, *, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._open: tuple[Runtime, contextlib.AsyncExitStack] | None = None
        self._lock = asyncio.Lock()
        self._failures = 0  # failed lazy starts in a row (this outage)
        self._retry_at = 0.0  # time.monotonic() before which none is tried

    @property
    def current(self) -> Runtime | None:
        """The open runtime, if any."""
        return self._open[0] if self._open is not None else None

    async def start(self) -> Runtime:
        """Open the runtime (idempotent). Raises if a resource cannot be opened."""
        if self._open is None:
            stack = contextlib.AsyncExitStack()
            runtime = await stack.enter_async_context(Runtime.open(self._config, clock=self._clock))
            self._open = runtime, stack
        return self._open[0]

    async def stop(self) -> None:
        """Close what :meth:`start` opened (idempotent)."""
        opened, self._open = self._open, None
        if opened is not None:
            await opened[1].aclose()

    async def get(self) -> Runtime:
        """The runtime, started now if need be; raises while starting fails (and
        :class:`StartBackoff` until the next attempt is due)."""
        runtime = self.current
        if runtime is not None:
            return runtime
        if time.monotonic() < self._retry_at:
            raise StartBackoff
        async with self._lock:
            runtime = self.current
            if runtime is not None:
                return runtime
            # Re-checked: the attempt of a request we waited behind may just have failed.
            if time.monotonic() < self._retry_at:
                raise StartBackoff
            try:
                runtime = await self.start()
            except Exception as exc:
                self._start_failed(exc)
                raise
            if self._failures:
                _log.warning("the verifier started after %d failed attempt(s)", self._failures)
                self._failures = 0
            return runtime

    def _start_failed(self, exc: Exception) -> None:
        self._failures += 1
        exponent = min(self._failures - 1, 16)
        delay = min(_START_BACKOFF_MAX, _START_BACKOFF_MIN * 2**exponent)
        self._retry_at = time.monotonic() + delay
        if self._failures == 1:
            _log.error(
                "the verifier could not start; every governed request is denied "
                "(503 audit_unavailable); next attempt in %g s",
                delay,
                exc_info=exc,
            )
        else:
            _log.warning(
                "the verifier still cannot start (attempt %d: %s); next attempt in %g s",
                self._failures,
                type(exc).__name__,
                delay,
            )


# --------------------------------------------------------------------------- the parts


def _calls_issuer(config: VerifierConfig) -> bool:
    return (
        (isinstance(config.jwks, JwksConfig) and config.jwks.url is not None)
        or (isinstance(config.revocations, RevocationConfig) and config.revocations.url is not None)
        or config.approvals is not None
    )


def _issuer_client(config: VerifierConfig, own_svid: Any) -> httpx.AsyncClient:
    """The mTLS client to the issuer, presenting this service's own SVID."""
    server_id = config.issuer_id
    if server_id is None:
        td = own_svid.svid().spiffe_id.trust_domain
        server_id = SpiffeId(td, _ISSUER_PATH)
    context = client_context(own_svid, server_id=server_id)
    # trust_env off: no proxy or netrc from the environment on an mTLS channel.
    return httpx.AsyncClient(verify=context, trust_env=False, follow_redirects=False)


def _jwks_source(jwks: JwksConfig | JwksSource, client: httpx.AsyncClient | None) -> JwksSource:
    if not isinstance(jwks, JwksConfig):
        return jwks  # a source object given in code
    if jwks.keys is not None:
        return StaticJwks(jwks.keys)
    if jwks.file is not None:
        return FileJwks(jwks.file, refetch_min_interval=jwks.refetch_min_interval)
    assert jwks.url is not None and client is not None
    return HttpJwks(
        jwks.url,
        client,
        cache_ttl=jwks.cache_ttl,
        refetch_min_interval=jwks.refetch_min_interval,
        max_stale=jwks.max_stale,
        timeout=jwks.timeout,
    )


def _revocation_source(
    revs: RevocationConfig | RevocationSource, client: httpx.AsyncClient | None
) -> RevocationSource:
    if not isinstance(revs, RevocationConfig):
        return revs  # a source object given in code
    if revs.database_url is not None:
        return DatabaseRevocationSource(
            revs.database_url, interval=revs.interval, max_stale=revs.max_stale
        )
    assert revs.url is not None and client is not None
    return IssuerRevocationPoller(
        revs.url, client, interval=revs.interval, max_stale=revs.max_stale, timeout=revs.timeout
    )


async def _purge_loop(replay: ReplayGuard, clock: Callable[[], float]) -> None:
    while True:
        # A wide margin: a verifier whose clock runs ahead must not purge jtis
        # that replicas with a correct clock would still accept (tokens live <= 300 s).
        before = int(clock()) - _PURGE_MARGIN
        try:
            removed = await asyncio.to_thread(replay.purge, before)
            if removed:
                _log.debug("purged %d expired single-use jtis", removed)
        except Exception as exc:  # best effort: expired rows only cost space
            _log.warning("purging used jtis failed: %s", type(exc).__name__)
        await asyncio.sleep(_PURGE_EVERY)


def _in_thread(close: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.to_thread(close)

    return run


def _cancelling(task: asyncio.Task[Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return run
