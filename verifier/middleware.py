"""``AxidVerifier``: the pure ASGI middleware in front of a service's routes.

One request, from the socket to the log entry::

    uvicorn (mtls.uvicorn) fills scope["extensions"]["tls"]["client_cert_chain"]
      -> AxidVerifier.__call__
           rule = first route rule matching (method, path)
           ungoverned rule?  -> the app, unchecked and unrecorded
           presented = chain, client address, token header, XFCC   (_presented)
           decision = await pipeline.decide(presented, rule)       steps 1-7
           await log.append(decision fields)                       step 8: committed
             ...failed?  -> 503 audit_unavailable, the app never runs
           metrics, span attributes, one log line
           deny  -> 401/403/503 application/problem+json + WWW-Authenticate
           allow -> scope["state"]["axid"] = VerifiedAction; the app runs

Use it as ``app.add_middleware(AxidVerifier, config=...)`` (FastAPI, Starlette) or
wrap any ASGI app: ``AxidVerifier(app, config=...)``.

Resources (trust bundles, the decision log, the single-use store, the JWKS and
revocation fetchers) are opened on ASGI lifespan startup, before the app's own
startup runs, and closed after the app's shutdown completed. Without a lifespan
(``--lifespan off``, some test clients) they are opened on the first request,
once, under a lock; if that fails the request is answered 503
``audit_unavailable`` and the next request tries again. One instance serves one
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import httpx

from axid.audit.log import DecisionLog
from mtls.sources import FileSource, WorkloadApiSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from verifier.checks import RequestInfo
from verifier.config import JwksConfig, RevocationConfig, VerifierConfig
from verifier.decision import Decision
from verifier.identity import BundleFiles, PeerResolver
from verifier.jwks import FileJwks, HttpJwks, JwksSource, StaticJwks
from verifier.observability import VerifierMetrics, annotate_span, log_decision
from verifier.pipeline import Pipeline, Presented
from verifier.replay import ReplayGuard
from verifier.revocation import DatabaseRevocationSource, IssuerRevocationPoller, RevocationSource
from verifier.rules import RuleSet

__all__ = ["AxidVerifier", "problem_body"]

_log = logging.getLogger(__name__)

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_XFCC: Final = b"x-forwarded-client-cert"
_MAX_LOGGED_PATH: Final = 2048
_PURGE_EVERY: Final = 600.0
_PURGE_MARGIN: Final = 3600
_ISSUER_PATH: Final = "/axid/issuer"


def problem_body(decision: Decision) -> bytes:
    """The RFC 9457 problem+json body of a deny (the issuer's shape)."""
    return json.dumps(
        {
            "type": "about:blank",
            "title": decision.title,
            "status": decision.status,
            "detail": decision.detail,
            "reason": decision.reason,
        },
        separators=(",", ":"),
    ).encode("utf-8")


def _unrecorded(decision: Decision) -> Decision:
    """The decision could not be committed: whatever it was, the answer is a deny."""
    return dataclasses.replace(
        decision,
        allow=False,
        reason="audit_unavailable",
        detail="the decision could not be recorded; nothing is allowed unrecorded",
        action=None,
    )


class _Runtime:
    """What startup opened, and how to close it (in reverse)."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.pipeline: Pipeline | None = None
        self.log: DecisionLog | None = None
        self.jwks: JwksSource | None = None
        self.revocations: RevocationSource | None = None
        self.replay: ReplayGuard | None = None

    async def close(self) -> None:
        while self.closers:
            closer = self.closers.pop()
            try:
                await closer()
            except Exception:  # closing one part must not stop closing the rest
                _log.warning("error while closing the verifier", exc_info=True)


def _sync_closer(close: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.to_thread(close)

    return run


def _task_closer(task: asyncio.Task[Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return run


class AxidVerifier:
    """ASGI middleware verifying every governed request (see the module docstring).

    ``clock`` (Unix seconds) overrides ``config.clock`` for token times; ``metrics``
    lets the caller hold the :class:`VerifierMetrics` (e.g. to mount its
    ``metrics_app`` when the middleware is added with ``app.add_middleware``).
    """

    def __init__(
        self,
        app: _ASGIApp,
        config: VerifierConfig,
        *,
        clock: Callable[[], float] | None = None,
        metrics: VerifierMetrics | None = None,
    ) -> None:
        if not isinstance(config, VerifierConfig):
            raise TypeError("config must be a VerifierConfig")
        self.app = app
        self.config = config
        self.clock = clock or config.clock
        self.metrics = metrics if metrics is not None else VerifierMetrics()
        self._rules: RuleSet = config.rule_set
        self._header = config.header.lower().encode("latin-1")
        self._runtime: _Runtime | None = None
        self._start_lock = asyncio.Lock()

    # ------------------------------------------------------------------ accessors

    @property
    def metrics_app(self) -> _ASGIApp:
        """ASGI app of this verifier's Prometheus metrics (mount it, ungoverned)."""
        return self.metrics.metrics_app

    @property
    def started(self) -> bool:
        return self._runtime is not None

    @property
    def pipeline(self) -> Pipeline | None:
        return self._runtime.pipeline if self._runtime else None

    @property
    def revocations(self) -> RevocationSource | None:
        return self._runtime.revocations if self._runtime else None

    @property
    def jwks(self) -> JwksSource | None:
        return self._runtime.jwks if self._runtime else None

    @property
    def decision_log(self) -> DecisionLog | None:
        return self._runtime.log if self._runtime else None

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if kind == "http" else "GET"
        path = scope.get("path", "")
        rule = self._rules.match(method, path)
        if rule is not None and not rule.governed:
            await self.app(scope, receive, send)
            return

        began = time.perf_counter()
        logged_path = path[:_MAX_LOGGED_PATH]
        seq: int | None = None
        try:
            runtime = await self._ensure_started()
        except Exception:
            _log.exception("the verifier could not start; denying")
            decision = Decision(
                False, "audit_unavailable", "the verifier could not open its decision log"
            )
        else:
            assert runtime.pipeline is not None and runtime.log is not None
            decision = await runtime.pipeline.decide(self._presented(scope, method, path), rule)
            fields = decision.log_fields(
                method=method, path=logged_path, service=self.config.service
            )
            try:
                receipt = await runtime.log.append(fields)  # committed when this returns
            except Exception as exc:  # AuditUnavailable, or an entry the log refused
                _log.warning("decision log append failed (%s): denying", type(exc).__name__)
                decision = _unrecorded(decision)
            else:
                seq = receipt.seq

        self.metrics.observe(decision, time.perf_counter() - began)
        annotate_span(decision)
        log_decision(decision, method=method, path=logged_path, seq=seq)
        if not decision.allow:
            await _refuse(scope, send, decision)
            return
        assert decision.action is not None
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["axid"] = dataclasses.replace(decision.action, log_seq=seq)
        await self.app(scope, receive, send)

    def _presented(self, scope: _Scope, method: str, path: str) -> Presented:
        token: str | None = None
        count = 0
        xfcc: list[str] = []
        headers: list[tuple[bytes, bytes]] = []
        for name, value in scope.get("headers", ()):
            if name == self._header:
                count += 1
                token = value.decode("latin-1")
                continue  # custom checks never see the token
            if name == _XFCC:
                xfcc.append(value.decode("latin-1"))
            headers.append((name, value))
        extensions = scope.get("extensions") or {}
        tls = extensions.get("tls") if isinstance(extensions, dict) else None
        chain: list[str | bytes] | None
        if isinstance(tls, dict):
            presented = tls.get("client_cert_chain")
            chain = list(presented) if isinstance(presented, list | tuple) else []
        elif scope.get("scheme") in ("https", "wss"):
            chain = []  # TLS without the extension: the client certificate is unknown
        else:
            chain = None
        client = scope.get("client")
        info = RequestInfo(
            method=method,
            path=path,
            query_string=scope.get("query_string", b""),
            headers=tuple(headers),
            client=tuple(client) if client else None,  # type: ignore[arg-type]
        )
        return Presented(
            method=method,
            path=path,
            tls_chain=chain,
            client_ip=client[0] if client else None,
            token=token,
            token_headers=count,
            xfcc=",".join(xfcc) if xfcc else None,
            info=info,
        )

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        async def receive_hook() -> _Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()  # a failure fails the app's startup
            return message

        async def send_hook(message: _Message) -> None:
            if message["type"] in (
                "lifespan.startup.failed",  # the app's own startup failed after ours
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
            ):
                await self.shutdown()
            await send(message)

        await self.app(scope, receive_hook, send_hook)

    async def _ensure_started(self) -> _Runtime:
        runtime = self._runtime
        if runtime is not None:
            return runtime
        async with self._start_lock:
            if self._runtime is None:
                await self.startup()
            assert self._runtime is not None
            return self._runtime

    async def startup(self) -> None:
        """Open every resource (idempotent). Raises if one cannot be opened."""
        if self._runtime is not None:
            return
        runtime = _Runtime()
        try:
            await self._open(runtime)
        except BaseException:
            await runtime.close()
            raise
        self._runtime = runtime

    async def shutdown(self) -> None:
        """Close what :meth:`startup` opened (idempotent)."""
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.close()

    async def _open(self, rt: _Runtime) -> None:
        config = self.config
        # Trust bundles, and this service's own SVID for calls to the issuer.
        bundles: Callable[[], Any]
        client_source: Any = None
        if config.source is not None:
            bundles = config.source.bundles
            client_source = config.source if hasattr(config.source, "svid") else None
        else:
            ident = config.identity
            assert ident is not None  # checked by the config
            if ident.workload_api is not None:
                source = await asyncio.to_thread(WorkloadApiSource, ident.workload_api)
                rt.closers.append(_sync_closer(source.close))
                bundles, client_source = source.bundles, source
            else:
                files = await asyncio.to_thread(BundleFiles, ident.bundle)
                bundles = files.bundles
                if ident.cert is not None and ident.key is not None:
                    client_source = await asyncio.to_thread(
                        FileSource, ident.cert, ident.key, ident.bundle[0]
                    )
                    rt.closers.append(_sync_closer(client_source.close))

        # The decision log first: without it nothing may be allowed anyway.
        rt.log = await DecisionLog.open(
            config.log.url,
            log=config.log_name,
            key=config.log.key,
            create_key=config.log.create_key,
            max_batch=config.log.max_batch,
            max_delay=config.log.max_delay,
            lock_timeout=config.log.lock_timeout,
        )
        rt.closers.append(rt.log.close)

        if self._rules.has_single_use:
            rt.replay = await asyncio.to_thread(
                ReplayGuard.open,
                config.replay_url,
                service=config.service,
                lock_timeout=config.replay.lock_timeout,
            )
            rt.closers.append(_sync_closer(rt.replay.close))

        client: httpx.AsyncClient | None = None
        if _calls_issuer(config):
            client = self._issuer_client(client_source)
            rt.closers.append(client.aclose)

        rt.jwks = _jwks_source(config.jwks, client)
        await rt.jwks.start()
        rt.closers.append(rt.jwks.close)
        rt.revocations = _revocation_source(config.revocations, client)
        await rt.revocations.start()
        rt.closers.append(rt.revocations.close)

        rt.pipeline = Pipeline(
            config=config,
            peers=PeerResolver(bundles, config.trusted_proxies),  # type: ignore[arg-type]
            jwks=rt.jwks,
            revocations=rt.revocations,
            replay=rt.replay,
            clock=self.clock,
        )
        if rt.replay is not None:
            task = asyncio.get_running_loop().create_task(
                self._purge_loop(rt.replay), name="axid-replay-purge"
            )
            rt.closers.append(_task_closer(task))

    def _issuer_client(self, source: Any) -> httpx.AsyncClient:
        server_id = self.config.issuer_id
        if server_id is None:
            td = source.svid().spiffe_id.trust_domain
            server_id = SpiffeId(td, _ISSUER_PATH)
        context = client_context(source, server_id=server_id)  # type: ignore[arg-type]
        # trust_env off: no proxy or netrc from the environment on an mTLS channel.
        return httpx.AsyncClient(verify=context, trust_env=False, follow_redirects=False)

    async def _purge_loop(self, replay: ReplayGuard) -> None:
        while True:
            # A wide margin: a verifier whose clock runs ahead must not purge jtis
            # that replicas with a correct clock would still accept (tokens live <= 300 s).
            before = int(self.clock()) - _PURGE_MARGIN
            try:
                removed = await asyncio.to_thread(replay.purge, before)
                if removed:
                    _log.debug("purged %d expired single-use jtis", removed)
            except Exception as exc:  # best effort: expired rows only cost space
                _log.warning("purging used jtis failed: %s", type(exc).__name__)
            await asyncio.sleep(_PURGE_EVERY)


def _calls_issuer(config: VerifierConfig) -> bool:
    return (isinstance(config.jwks, JwksConfig) and config.jwks.url is not None) or (
        isinstance(config.revocations, RevocationConfig) and config.revocations.url is not None
    )


def _jwks_source(jwks: Any, client: httpx.AsyncClient | None) -> JwksSource:
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


def _revocation_source(revs: Any, client: httpx.AsyncClient | None) -> RevocationSource:
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


async def _refuse(scope: _Scope, send: _Send, decision: Decision) -> None:
    """Answer a deny: problem+json with ``WWW-Authenticate: AXID error="<reason>"``."""
    if scope["type"] == "websocket":
        # Closing before accepting makes the server refuse the handshake (HTTP 403).
        await send({"type": "websocket.close", "code": 1008, "reason": decision.reason})
        return
    body = problem_body(decision)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        (b"www-authenticate", f'AXID error="{decision.reason}"'.encode("ascii")),
    ]
    await send({"type": "http.response.start", "status": decision.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
