"""``AxidVerifier``: the pure ASGI middleware in front of a service's routes.

One request, from the socket to the log entry::

    uvicorn (mtls.uvicorn) fills scope["extensions"]["tls"]["client_cert_chain"]
                           and scope["extensions"]["axid.transport"] (socket peer, TLS?)
      -> AxidVerifier.__call__
           GET /.well-known/axid/log/{checkpoint,proof,consistency}
                             -> answered here (verifier.logroutes): ungoverned, unrecorded
           method or path not in normal form?  -> no rule matches (see below)
           rule = first route rule matching (method, path)
           ungoverned rule?  -> the app, unchecked and unrecorded
           presented = chain, socket peer, token header, XFCC      (_presented)
           decision = await pipeline.decide(presented, rule)       steps 1-7
             ...raised?  -> 503 audit_unavailable (recorded), see below
           await log.append(decision fields)                       step 8: committed
             ...failed?  -> 503 audit_unavailable, the app never runs
           metrics, span attributes, one log line
           deny  -> 401/403/503 application/problem+json + WWW-Authenticate
           allow -> scope["state"]["axid"] = VerifiedAction; the app runs

Every recorded decision's response, deny or allow, carries ``AXID-Receipt:
<Receipt.header_value()>`` (seq, leaf hash, entry bytes, signed checkpoint): on a
deny in the problem+json answer, on an allow appended to the app's
``http.response.start`` headers. A 503 ``audit_unavailable`` (nothing committed) has
none, and neither has a WebSocket deny (a close frame carries no headers).

Use it as ``app.add_middleware(AxidVerifier, config=...)`` (FastAPI, Starlette) or
wrap any ASGI app: ``AxidVerifier(app, config=...)``.

Transport facts come from the ``axid.transport`` scope extension that
:mod:`mtls.uvicorn`'s protocol classes fill from the socket, never from
``scope["client"]`` or ``scope["scheme"]`` (uvicorn's proxy-headers middleware
rewrites both from ``X-Forwarded-For`` / ``X-Forwarded-Proto``). Without that
extension the connection is TLS exactly when the ASGI TLS extension is present, and
no ``trusted_proxies`` IP network is ever matched (fail closed; a warning is logged).

Normal form, checked before any rule is matched, so that such a request can never
match an ungoverned rule (``/public/**`` must not let ``/public/../payments/p-1``
through): the method must be an RFC 9110 token of at most 32 characters, the path
must start with ``/`` and hold no ``.`` or ``..`` segment and no empty segment
(``//``) except a single trailing ``/`` (so ``/`` and ``/payments/`` are fine), and
``raw_path`` no percent-encoded ``/`` or ``.`` (``%2F``, ``%2E``). Anything else is
governed with no rule: it goes through steps 1-4 and is denied at step 5 with 403
``scope_insufficient`` (note: what is wrong), recorded like every other decision; the
log gets the method cut to 32 characters (marked ``...``) and the path to 2048.

If deciding raises (a bug, a misbehaving source given in code), the request is denied
503 ``audit_unavailable`` (note ``internal error: <ExceptionType>``), recorded, and the
traceback logged: nothing is allowed unverified. Custom checks that raise are denied
403 ``custom_check_denied`` by the pipeline. ``asyncio.CancelledError`` from a
cancelled request task (client gone, server shutdown) propagates: nothing is
decided, recorded or allowed; a stray one (the task was not cancelled) is a failure
like any other.

Resources (trust bundles, the decision log, the single-use store, the JWKS and
revocation fetchers) are opened on ASGI lifespan startup, before the app's own
startup runs, and closed after the app's shutdown completed. Without a lifespan
(``--lifespan off``, some test clients) they are opened on the first request,
once, under a lock; if that fails the request is answered 503
``audit_unavailable``, and so is every request until the next attempt, which a
later request makes after a backoff (1 s, doubling up to 30 s). The traceback is
logged once per outage; later failed attempts log one line each. One instance
serves one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import httpx

from axid.audit.log import DecisionLog
from axid.audit.metrics import LogCollector
from axid.audit.receipt import RECEIPT_HEADER, Receipt
from mtls.sources import FileSource, WorkloadApiSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context
from verifier.checks import RequestInfo
from verifier.config import JwksConfig, RevocationConfig, VerifierConfig
from verifier.decision import Decision, VerifiedAction
from verifier.identity import BundleFiles, PeerResolver
from verifier.jwks import FileJwks, HttpJwks, JwksSource, StaticJwks
from verifier.logroutes import LOG_ROUTES, LogRoute, serve_log_route
from verifier.observability import VerifierMetrics, annotate_span, log_decision
from verifier.pipeline import Pipeline, Presented
from verifier.replay import ReplayGuard
from verifier.revocation import DatabaseRevocationSource, IssuerRevocationPoller, RevocationSource
from verifier.rules import RouteRule, RuleSet

__all__ = ["AxidVerifier", "problem_body"]

_log = logging.getLogger(__name__)

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_XFCC: Final = b"x-forwarded-client-cert"
# mtls.uvicorn.TRANSPORT_EXTENSION (not imported: the verifier runs under any server).
_TRANSPORT: Final = "axid.transport"
_MAX_LOGGED_PATH: Final = 2048
_MAX_METHOD: Final = 32
# RFC 9110 section 5.6.2: token = 1*tchar.
_METHOD_RE: Final = re.compile(rf"[!#$%&'*+.^_`|~0-9A-Za-z-]{{1,{_MAX_METHOD}}}")
_ENCODED_SLASH_OR_DOT: Final = re.compile(rb"%2[ef]", re.IGNORECASE)
_START_BACKOFF_MIN: Final = 1.0
_START_BACKOFF_MAX: Final = 30.0
_PURGE_EVERY: Final = 600.0
_PURGE_MARGIN: Final = 3600
_ISSUER_PATH: Final = "/axid/issuer"
_RECEIPT_NAME: Final = RECEIPT_HEADER.lower().encode("ascii")


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


def _unroutable(method: object, path: object, raw_path: object) -> str | None:
    """Why a request cannot be matched to a route rule (see the module doc), or None."""
    if not isinstance(method, str) or _METHOD_RE.fullmatch(method) is None:
        return f"the method is not an HTTP method token of at most {_MAX_METHOD} characters"
    if not isinstance(path, str) or not path.startswith("/"):
        return "the path does not start with '/'"
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            return "the path has a '.' or '..' segment"
        if not segment and index != len(segments) - 1:
            return "the path has an empty segment ('//')"
    if isinstance(raw_path, bytes | bytearray) and _ENCODED_SLASH_OR_DOT.search(raw_path):
        return "the raw path has a percent-encoded '/' or '.'"
    return None


def _clip(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _transport(value: object) -> tuple[tuple[str, int] | None, bool] | None:
    """(socket peer, is TLS) from mtls.uvicorn's extension; None if absent or malformed."""
    if not isinstance(value, dict) or type(value.get("tls")) is not bool:
        return None
    peer = value.get("peer")
    if not (
        isinstance(peer, list | tuple)
        and len(peer) == 2
        and isinstance(peer[0], str)
        and type(peer[1]) is int
    ):
        peer = None
    return (peer[0], peer[1]) if peer is not None else None, value["tls"]


def _being_cancelled() -> bool:
    """Whether the current task has been asked to cancel (not a stray CancelledError)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _with_seq(action: VerifiedAction, seq: int | None) -> VerifiedAction:
    """``action`` with its log position (dataclasses.replace, without its per-call
    field introspection: this runs once per allowed request)."""
    return VerifiedAction(
        action.spiffe_id,
        action.tenant,
        action.agent,
        action.run,
        action.spawn_parent,
        action.chain,
        action.scope,
        action.jti,
        action.claims,
        seq,
    )


class _StartBackoff(Exception):
    """Startup failed recently; the next attempt is not due yet."""


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
        self.metrics.registry.register(LogCollector(self._open_logs))
        self._rules: RuleSet = config.rule_set
        self._header = config.header.lower().encode("latin-1")
        self._runtime: _Runtime | None = None
        self._start_lock = asyncio.Lock()
        self._start_failures = 0  # failed lazy starts in a row (this outage)
        self._start_retry_at = 0.0  # time.monotonic() before which none is tried
        self._warned_no_transport = False

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

    def _open_logs(self) -> list[DecisionLog]:
        log = self.decision_log
        return [] if log is None else [log]

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
        log_route = LOG_ROUTES.get(path) if kind == "http" else None
        if log_route is not None:  # the log's public read routes: ungoverned, unrecorded
            await self._serve_log_route(scope, send, log_route)
            return
        # Checked before matching: such a request never matches any rule, ungoverned
        # ones included, and is denied (recorded) at step 5.
        unroutable = _unroutable(method, path, scope.get("raw_path"))
        rule = None if unroutable is not None else self._rules.match(method, path)
        if rule is not None and not rule.governed:
            await self.app(scope, receive, send)
            return

        began = time.perf_counter()
        logged_method = _clip(method, _MAX_METHOD)
        logged_path = _clip(path, _MAX_LOGGED_PATH)
        decision, receipt = await self._decide_and_record(
            scope, method, path, rule, unroutable, logged=(logged_method, logged_path)
        )
        seq = receipt.seq if receipt is not None else None
        self.metrics.observe(decision, time.perf_counter() - began)
        annotate_span(decision)
        log_decision(decision, method=logged_method, path=logged_path, seq=seq)
        # Only a committed decision has a receipt (not a 503 audit_unavailable).
        header = _receipt_header(receipt)
        if not decision.allow:
            await _refuse(scope, send, decision, header)
            return
        assert decision.action is not None
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["axid"] = _with_seq(decision.action, seq)
        await self.app(scope, receive, _send_with(send, header) if header else send)

    async def _decide_and_record(
        self,
        scope: _Scope,
        method: str,
        path: str,
        rule: RouteRule | None,
        unroutable: str | None,
        *,
        logged: tuple[str, str],
    ) -> tuple[Decision, Receipt | None]:
        """Steps 1-8: the decision and, once it is committed, its receipt (else None,
        and the decision is a 503 ``audit_unavailable`` deny)."""
        try:
            runtime = await self._ensure_started()
        except Exception:  # logged by _ensure_started, once per outage
            reason = "the verifier could not open its decision log"
            return Decision(False, "audit_unavailable", reason), None
        assert runtime.pipeline is not None and runtime.log is not None
        decision = await self._decide(runtime.pipeline, scope, method, path, rule, unroutable)
        fields = decision.log_fields(method=logged[0], path=logged[1], service=self.config.service)
        try:
            return decision, await runtime.log.append(fields)  # committed when this returns
        except Exception as exc:  # AuditUnavailable, or an entry the log refused
            _log.warning("decision log append failed (%s): denying", type(exc).__name__)
            return _unrecorded(decision), None

    async def _serve_log_route(self, scope: _Scope, send: _Send, route: LogRoute) -> None:
        """A public read route of this service's own log (see :mod:`verifier.logroutes`)."""
        try:
            runtime = await self._ensure_started()
        except Exception:  # logged by _ensure_started, once per outage
            runtime = None
        store = runtime.log.store if runtime is not None and runtime.log is not None else None
        await serve_log_route(scope, send, route, store)

    async def _decide(
        self,
        pipeline: Pipeline,
        scope: _Scope,
        method: str,
        path: str,
        rule: RouteRule | None,
        unroutable: str | None,
    ) -> Decision:
        """Steps 1-7; any failure of them is a deny (recorded by the caller)."""
        try:
            return await pipeline.decide(self._presented(scope, method, path, unroutable), rule)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise  # the request is cancelled: nothing to decide, record or allow
            _log.error("deciding a request failed; denying it", exc_info=True)
            return Decision(
                False,
                "audit_unavailable",
                "the verifier failed while deciding; nothing is allowed unverified",
                rule=rule.label if rule is not None else None,
                scope_required=rule.scope_required if rule is not None else None,
                note=f"internal error: {type(exc).__name__}",
            )

    def _presented(
        self, scope: _Scope, method: str, path: str, unroutable: str | None
    ) -> Presented:
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
        extensions = scope.get("extensions")
        if not isinstance(extensions, dict):
            extensions = {}
        tls = extensions.get("tls")
        # Never scope["scheme"] / scope["client"]: X-Forwarded-Proto/-For rewrite them.
        transport = _transport(extensions.get(_TRANSPORT))
        client: Any
        if transport is not None:
            client, is_tls = transport
        else:
            client, is_tls = scope.get("client"), isinstance(tls, dict)
            if xfcc and not self._warned_no_transport and self.config.trusted_proxies.has_networks:
                self._warned_no_transport = True
                _log.warning(
                    "x-forwarded-client-cert ignored: no %s scope extension, so the socket "
                    "peer is unknown and no trusted_proxies IP network can match; serve "
                    "with --http mtls.uvicorn:H11TLSProtocol (also without TLS)",
                    _TRANSPORT,
                )
        chain: list[str | bytes] | None
        if isinstance(tls, dict):
            presented = tls.get("client_cert_chain")
            chain = list(presented) if isinstance(presented, list | tuple) else []
            if not is_tls:
                chain = []  # a TLS extension on a plain connection: believe neither
        elif is_tls:
            chain = []  # TLS without the extension: the client certificate is unknown
        else:
            chain = None
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
            # Only the socket peer of a plain-TCP connection may be a trusted IP proxy.
            client_ip=client[0] if transport is not None and client and not is_tls else None,
            token=token,
            token_headers=count,
            xfcc=",".join(xfcc) if xfcc else None,
            info=info,
            xfcc_headers=len(xfcc),
            unroutable=unroutable,
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
        """The runtime, started lazily; raises while startup fails (with a backoff)."""
        runtime = self._runtime
        if runtime is not None:
            return runtime
        if time.monotonic() < self._start_retry_at:
            raise _StartBackoff
        async with self._start_lock:
            if self._runtime is None:
                # Re-checked: the attempt of a request we waited behind may just have failed.
                if time.monotonic() < self._start_retry_at:
                    raise _StartBackoff
                try:
                    await self.startup()
                except Exception as exc:
                    self._start_failed(exc)
                    raise
                if self._start_failures:
                    _log.warning(
                        "the verifier started after %d failed attempt(s)", self._start_failures
                    )
                    self._start_failures = 0
            assert self._runtime is not None
            return self._runtime

    def _start_failed(self, exc: Exception) -> None:
        self._start_failures += 1
        exponent = min(self._start_failures - 1, 16)
        delay = min(_START_BACKOFF_MAX, _START_BACKOFF_MIN * 2**exponent)
        self._start_retry_at = time.monotonic() + delay
        if self._start_failures == 1:
            _log.error(
                "the verifier could not start; every governed request is denied "
                "(503 audit_unavailable); next attempt in %g s",
                delay,
                exc_info=exc,
            )
        else:
            _log.warning(
                "the verifier still cannot start (attempt %d: %s); next attempt in %g s",
                self._start_failures,
                type(exc).__name__,
                delay,
            )

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
        if self.config.trusted_proxies.has_networks:
            _log.warning(
                "trusted_proxies names IP networks: they are matched only against the "
                "socket peer that mtls.uvicorn's protocol classes record (serve with "
                "--http mtls.uvicorn:H11TLSProtocol, also for plain TCP); under any other "
                "server x-forwarded-client-cert from them is ignored"
            )

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
                        FileSource, ident.cert, ident.key, ident.bundle
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
            head=config.log.head,
            head_required=config.log.head_required,
            witnesses=config.log.witnesses,
            quorum=config.log.quorum,
            witness_mode=config.log.witness_mode,
            witness_timeout=config.log.witness_timeout,
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


def _receipt_header(receipt: Receipt | None) -> tuple[bytes, bytes] | None:
    """The ``AXID-Receipt`` response header of a committed decision."""
    if receipt is None:
        return None
    return _RECEIPT_NAME, receipt.header_value().encode("ascii")


def _send_with(send: _Send, header: tuple[bytes, bytes]) -> _Send:
    """``send``, adding ``header`` to the app's ``http.response.start``."""

    async def send_with_header(message: _Message) -> None:
        if message["type"] == "http.response.start":
            # A new list: the app may reuse the one it sent.
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_header


async def _refuse(
    scope: _Scope, send: _Send, decision: Decision, receipt: tuple[bytes, bytes] | None
) -> None:
    """Answer a deny: problem+json with ``WWW-Authenticate: AXID error="<reason>"`` and,
    when the deny was recorded, its ``AXID-Receipt``."""
    if scope["type"] == "websocket":
        # Closing before accepting makes the server refuse the handshake (HTTP 403);
        # a close carries no headers, so no receipt either.
        await send({"type": "websocket.close", "code": 1008, "reason": decision.reason})
        return
    body = problem_body(decision)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        (b"www-authenticate", f'AXID error="{decision.reason}"'.encode("ascii")),
    ]
    if receipt is not None:
        headers.append(receipt)
    await send({"type": "http.response.start", "status": decision.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
