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
           approval rule?    -> the body is read (up to approvals.max_body) and hashed;
                                the app later receives exactly those bytes
           runtime = the open resources (verifier.runtime; opened now if need be)
           presented = chain, socket peer, token header, XFCC      (_presented)
           decision = await runtime.pipeline.decide(presented, rule)   steps 1-7
             ...raised?  -> 503 audit_unavailable (recorded), see below
           await runtime.log.append(decision.record)               step 8: committed
             ...failed?  -> 503 audit_unavailable, the app never runs
           metrics, span attributes, one log line
           deny  -> 401/403/503 application/problem+json + WWW-Authenticate
                    (verifier.responses.refuse)
           allow -> scope["state"]["axid"] = VerifiedAction; the app runs, its
                    response start gets the AXID-Receipt header (verifier.responses)

Every recorded decision's response carries its ``AXID-Receipt`` (see
:mod:`verifier.responses`); a 503 ``audit_unavailable`` (nothing committed) has none.

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
revocation fetchers) are one :class:`~verifier.runtime.Runtime`, opened on ASGI
lifespan startup, before the app's own startup runs, and closed after the app's
shutdown completed. Without a lifespan (``--lifespan off``, some test clients) the
first request opens it (:class:`~verifier.runtime.LazyRuntime`); while that fails,
governed requests are answered 503 ``audit_unavailable`` and attempts back off (1 s,
doubling up to 30 s). One instance serves one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from axid.audit.draft import DecisionDraft
from axid.audit.log import DecisionLog
from axid.audit.metrics import LogCollector
from axid.audit.receipt import Receipt
from verifier.checks import RequestInfo, Undo
from verifier.config import VerifierConfig
from verifier.decision import UNRECORDABLE, Decision, VerifiedAction
from verifier.jwks import JwksSource
from verifier.logroutes import LOG_ROUTES, LogRoute, serve_log_route
from verifier.observability import VerifierMetrics, annotate_span, log_decision
from verifier.pipeline import Pipeline, Presented, _being_cancelled
from verifier.responses import receipt_header, refuse, with_header
from verifier.revocation import RevocationSource
from verifier.rules import RouteRule
from verifier.runtime import LazyRuntime, Runtime

__all__ = ["AxidVerifier"]

_log = logging.getLogger(__name__)

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_XFCC: Final = b"x-forwarded-client-cert"
_APPROVAL: Final = b"x-axid-approval"
# mtls.uvicorn.TRANSPORT_EXTENSION (not imported: the verifier runs under any server).
_TRANSPORT: Final = "axid.transport"
_MAX_LOGGED_PATH: Final = 2048
_MAX_METHOD: Final = 32
# RFC 9110 section 5.6.2: token = 1*tchar.
_METHOD_RE: Final = re.compile(rf"[!#$%&'*+.^_`|~0-9A-Za-z-]{{1,{_MAX_METHOD}}}")
_ENCODED_SLASH_OR_DOT: Final = re.compile(rb"%2[ef]", re.IGNORECASE)
# The ASGI extension letting a WebSocket handshake be answered with an HTTP response.
_WS_HTTP_RESPONSE: Final = "websocket.http.response"


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
        self._rules = config.rule_set
        self._header = config.header.lower().encode("latin-1")
        self._runtime = LazyRuntime(config, clock=self.clock)
        self._warned_no_transport = False
        self._max_body = config.approvals.max_body if config.approvals is not None else 0

    # ------------------------------------------------------------------ accessors

    @property
    def metrics_app(self) -> _ASGIApp:
        """ASGI app of this verifier's Prometheus metrics (mount it, ungoverned)."""
        return self.metrics.metrics_app

    @property
    def started(self) -> bool:
        return self._runtime.current is not None

    @property
    def pipeline(self) -> Pipeline | None:
        runtime = self._runtime.current
        return runtime.pipeline if runtime is not None else None

    @property
    def revocations(self) -> RevocationSource | None:
        runtime = self._runtime.current
        return runtime.revocations if runtime is not None else None

    @property
    def jwks(self) -> JwksSource | None:
        runtime = self._runtime.current
        return runtime.jwks if runtime is not None else None

    @property
    def decision_log(self) -> DecisionLog | None:
        runtime = self._runtime.current
        return runtime.log if runtime is not None else None

    def _open_logs(self) -> list[DecisionLog]:
        log = self.decision_log
        return [] if log is None else [log]

    # ------------------------------------------------------------------ lifespan

    async def startup(self) -> None:
        """Open every resource (idempotent). Raises if one cannot be opened."""
        await self._runtime.start()

    async def shutdown(self) -> None:
        """Close what :meth:`startup` opened (idempotent)."""
        await self._runtime.stop()

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

        body_sha256 = None
        if rule is not None and rule.approval_required and kind == "http":
            buffered = await _buffered_body(receive, self._max_body)
            if buffered is None:
                return  # the client left before its body arrived: nothing to decide
            body_sha256, receive = buffered

        began = time.perf_counter()
        logged_method = _clip(method, _MAX_METHOD)
        logged_path = _clip(path, _MAX_LOGGED_PATH)
        decision, receipt = await self._decide_and_record(
            scope,
            method,
            path,
            rule,
            unroutable,
            logged=(logged_method, logged_path),
            body_sha256=body_sha256,
        )
        seq = receipt.seq if receipt is not None else None
        self.metrics.observe(decision, time.perf_counter() - began)
        annotate_span(decision)
        log_decision(decision, method=logged_method, path=logged_path, seq=seq)
        # Only a committed decision has a receipt (not a 503 audit_unavailable).
        header = receipt_header(receipt)
        if not decision.allow:
            await _refuse(scope, send, decision, header)
            return
        assert decision.action is not None
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["axid"] = _with_seq(decision.action, seq)
        await self.app(scope, receive, with_header(send, header) if header else send)

    async def _decide_and_record(
        self,
        scope: _Scope,
        method: str,
        path: str,
        rule: RouteRule | None,
        unroutable: str | None,
        *,
        logged: tuple[str, str],
        body_sha256: str | None = None,
    ) -> tuple[Decision, Receipt | None]:
        """Steps 1-8: the decision and, once it is committed, its receipt (else None,
        and the decision is a 503 ``audit_unavailable`` deny)."""
        try:
            runtime = await self._runtime.get()
        except Exception:  # logged by LazyRuntime.get, once per outage
            reason = "the verifier could not open its decision log"
            return Decision(False, "audit_unavailable", reason), None
        decision, undo = await self._decide(
            runtime.pipeline, scope, method, path, rule, unroutable, logged, body_sha256
        )
        try:
            record = decision.record  # finished now: EntryError if the log format refuses it
            if record is None:
                raise RuntimeError("a decision without its record")
            return decision, await runtime.log.append(record)  # committed when this returns
        except Exception as exc:  # AuditUnavailable, or a field the log format refuses
            _log.warning("decision log append failed (%s): denying", type(exc).__name__)
            if undo is not None:  # not allowed in the end: release what checks reserved
                await undo()
            return _unrecorded(decision), None

    async def _serve_log_route(self, scope: _Scope, send: _Send, route: LogRoute) -> None:
        """A public read route of this service's own log (see :mod:`verifier.logroutes`)."""
        try:
            runtime: Runtime | None = await self._runtime.get()
        except Exception:  # logged by LazyRuntime.get, once per outage
            runtime = None
        store = runtime.log.store if runtime is not None else None
        await serve_log_route(scope, send, route, store)

    async def _decide(
        self,
        pipeline: Pipeline,
        scope: _Scope,
        method: str,
        path: str,
        rule: RouteRule | None,
        unroutable: str | None,
        logged: tuple[str, str],
        body_sha256: str | None = None,
    ) -> tuple[Decision, Undo | None]:
        """Steps 1-7, and the undo of an allow's reservations (Pipeline.decide_with_undo);
        any failure of them is a deny (recorded by the caller)."""
        if scope["type"] == "websocket":  # governed routes are HTTP only (DESIGN.md)
            draft = self._draft(rule, logged, "websocket upgrade")
            detail = "governed routes are HTTP only: WebSocket upgrades are refused"
            return Decision.of(draft, "unsupported_protocol", detail), None
        try:
            presented = self._presented(scope, method, path, unroutable, logged)
            if rule is not None and rule.approval_required:
                presented = _with_approval(presented, scope, body_sha256)
            return await pipeline.decide_with_undo(presented, rule)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                raise  # the request is cancelled: nothing to decide, record or allow
            _log.error("deciding a request failed; denying it", exc_info=True)
            draft = self._draft(rule, logged, f"internal error: {type(exc).__name__}")
            detail = "the verifier failed while deciding; nothing is allowed unverified"
            return Decision.of(draft, "audit_unavailable", detail), None

    def _draft(self, rule: RouteRule | None, logged: tuple[str, str], note: str) -> DecisionDraft:
        """The record of a request the middleware denies itself (no pipeline steps)."""
        draft = DecisionDraft(
            *logged,
            self.config.service,
            rule=rule.label if rule is not None else None,
            scope_required=rule.scope_required if rule is not None else None,
        )
        draft.add_note(note)
        return draft

    # ------------------------------------------------------------------ reading the scope

    def _presented(
        self,
        scope: _Scope,
        method: str,
        path: str,
        unroutable: str | None,
        logged: tuple[str, str],
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
        chain, client, client_ip = self._connection(scope, forwarded=bool(xfcc))
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
            client_ip=client_ip,
            token=token,
            token_headers=count,
            xfcc=",".join(xfcc) if xfcc else None,
            info=info,
            xfcc_headers=len(xfcc),
            unroutable=unroutable,
            logged_method=logged[0],
            logged_path=logged[1],
        )

    def _connection(
        self, scope: _Scope, *, forwarded: bool
    ) -> tuple[list[str | bytes] | None, Any, str | None]:
        """(the peer's TLS chain, None on plain TCP; the client address; the socket
        peer's IP when it may be a trusted proxy, else None)."""
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
            if forwarded and self.config.trusted_proxies.has_networks:
                self._warn_no_transport()
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
        # Only the socket peer of a plain-TCP connection may be a trusted IP proxy.
        client_ip = client[0] if transport is not None and client and not is_tls else None
        return chain, client, client_ip

    def _warn_no_transport(self) -> None:
        if self._warned_no_transport:
            return
        self._warned_no_transport = True
        _log.warning(
            "x-forwarded-client-cert ignored: no %s scope extension, so the socket "
            "peer is unknown and no trusted_proxies IP network can match; serve "
            "with --http mtls.uvicorn:H11TLSProtocol (also without TLS)",
            _TRANSPORT,
        )


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


async def _refuse(
    scope: _Scope, send: _Send, decision: Decision, receipt: tuple[bytes, bytes] | None
) -> None:
    """:func:`refuse`; a WebSocket handshake gets the same HTTP answer (problem+json,
    receipt) when the server has the ``websocket.http.response`` extension (uvicorn
    has), else :func:`refuse`'s close (a bare 403)."""
    extensions = scope.get("extensions")
    if scope["type"] != "websocket" or not (
        isinstance(extensions, dict) and _WS_HTTP_RESPONSE in extensions
    ):
        await refuse(scope, send, decision, receipt)
        return

    async def send_as_websocket(message: _Message) -> None:
        # http.response.start/body -> websocket.http.response.start/body: same keys.
        await send({**message, "type": "websocket." + message["type"]})

    await refuse({**scope, "type": "http"}, send_as_websocket, decision, receipt)


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


def _unrecorded(decision: Decision) -> Decision:
    """The decision could not be committed: whatever it was, the answer is a deny."""
    return dataclasses.replace(
        decision,
        allow=False,
        reason="audit_unavailable",
        detail=UNRECORDABLE,
        action=None,
    )


# --------------------------------------------------------------------------- approval routes


async def _buffered_body(receive: _Receive, cap: int) -> tuple[str | None, _Receive] | None:
    """Read the request body (at most ``cap`` bytes) for an approval route: (its hex
    SHA-256, or None when over the cap; a receive that hands the app exactly the bytes
    hashed, then the original receive's messages). None: the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > cap:
            return None, receive  # refused: the app never runs
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    pending: list[_Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> _Message:
        return pending.pop() if pending else await receive()

    return hashlib.sha256(body).hexdigest(), replay


def _with_approval(presented: Presented, scope: _Scope, body_sha256: str | None) -> Presented:
    """``presented`` with the approval header, the raw request target (query included)
    and the body's hash: what an approval is bound to."""
    approval: str | None = None
    count = 0
    for name, value in scope.get("headers", ()):
        if name == _APPROVAL:
            count += 1
            approval = value.decode("latin-1")
    raw = scope.get("raw_path")
    target = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else presented.path
    query = scope.get("query_string", b"")
    if query:
        target += "?" + bytes(query).decode("latin-1")
    headers = tuple(h for h in presented.info.headers if h[0] != _APPROVAL)
    return dataclasses.replace(
        presented,
        info=dataclasses.replace(presented.info, headers=headers),
        approval=approval,
        approval_headers=count,
        target=target,
        body_sha256=body_sha256,
    )
