"""Verifier benchmarks: ``token.verify_cached``, ``verifier.governed_rps``,
``verifier.latency_p50``, ``verifier.latency_p99``, ``verifier.check_cached``.

- ``token.verify_cached``: the verifier's token step for a token it has seen
  before (``Pipeline``'s token verification: key set, :class:`TokenCache` hit,
  the time re-checks). Baseline: one bare Ed25519 verify of the same token
  (cryptography): the cost a cache hit avoids. Aim: ratio >= 5, i.e. a hit
  costs under a fifth of one signature check.
- ``verifier.governed_rps``: requests/s of a route behind
  :class:`verifier.middleware.AxidVerifier` over mTLS, every one allowed and
  committed to the SQLite decision log before the route runs. Baseline: the
  same FastAPI route without the middleware, same server set-up. Aim: ratio
  >= 0.7.
- ``verifier.latency_p50`` / ``verifier.latency_p99``: microseconds per
  governed request (the same route, valid repeated token, allowed, committed
  to the decision log) from ONE keep-alive mTLS client sending sequentially.
  Baseline: the same percentile of the bare route, same run, same server
  set-up, same client. Both figures come from one measurement.
- ``verifier.check_cached``: the in-process cost of one governed request's
  checks, steps 1-7 (:meth:`verifier.pipeline.Pipeline.decide`) with a repeated
  token: no HTTP, no log append. Baseline: one bare Ed25519 verify. The human
  table also shows the same with a fresh token per call (cache miss).

The in-process figures use the pipeline of a started :class:`AxidVerifier`
(exactly what the middleware builds from its config; a ``StaticRevocations``
source so that no poll has to run meanwhile) and drive ``decide`` without an
event loop turn: on these paths it never suspends (checked on every call).
HTTP figures: see :mod:`bench.issuer` for how they are taken.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import ssl
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from axid.keys import KeySet, SigningKey
from axid.tokens import mint
from bench._harness import BenchError, Context, Result, compare_rates, rate, register
from bench._http import take_answer
from bench.issuer import (
    AUDIENCE,
    HOST,
    ISS,
    BenchPki,
    LoadPool,
    bench_pki,
    client_ssl,
    compare_pools,
    http_plan,
    http_request,
    log_entries,
    run_client,
    serving,
)

GOVERNED_CLIENTS: Final = 32
SERVICE: Final = "payments"
HEADER: Final = "X-Waxell-AXID"
PATH: Final = "/payments/p-1001"
_RULE: Final = {"methods": ["GET"], "path": "/payments/*", "scope": "payments:read"}
# Revoked runs that are not the benchmark's: step 6 looks at a non-empty set.
_REVOKED: Final = (("run", "bench-revoked-1"), ("run", "bench-revoked-2"), ("agent", "intruder"))

T = TypeVar("T")


# --------------------------------------------------------------------------- material


@dataclass(frozen=True)
class _Material:
    key: SigningKey
    jwks_file: Path
    sub: str
    cnf: str
    chain_pem: list[str]  # the planner's chain as mtls.uvicorn puts it in the TLS extension


def _material(ctx: Context, pki: BenchPki) -> _Material:
    m = ctx.shared.get("verifier.material")
    if m is None:
        from mtls.x509svid import x5t_s256

        d = ctx.tempdir("jwks-")
        key = SigningKey.from_private_key(Ed25519PrivateKey.generate())
        jwks_file = d / "jwks.json"
        jwks_file.write_text(json.dumps(KeySet.of(key.public_key).to_jwks()))
        certs = x509.load_pem_x509_certificates(pki.cert("planner").read_bytes())
        m = _Material(
            key=key,
            jwks_file=jwks_file,
            sub=pki.spiffe_id("planner"),
            cnf=x5t_s256(certs[0]),
            chain_pem=[ssl.DER_cert_to_PEM_cert(c.public_bytes(Encoding.DER)) for c in certs],
        )
        ctx.shared["verifier.material"] = m
    return m


def _token(m: _Material, run: str) -> str:
    """A root token of the planner for ``GET /payments/*``, valid for 300 s from now."""
    return mint(
        key=m.key,
        iss=ISS,
        sub=m.sub,
        aud=AUDIENCE,
        tenant="acme",
        agent="planner",
        run=run,
        spawn_parent=None,
        chain=[],
        scope="payments:read payments:refund",
        cnf_x5t_s256=m.cnf,
        now=int(time.time()),
        ttl=300,
    )


def _ed25519_baseline(m: _Material, token: str) -> Callable[[], object]:
    """A bare Ed25519 verify of ``token``'s signature (cryptography)."""
    header, payload, sig = token.split(".")
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    public_key: Ed25519PublicKey = m.key.public_key
    public_key.verify(signature, signing_input)  # raises if the baseline is not a real verify
    return lambda: public_key.verify(signature, signing_input)


# --------------------------------------------------------------------------- in-process


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that must finish without suspending; its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise BenchError("the measured path suspended: it is not an in-process cost")


class _InProcess:
    """A started AxidVerifier (its own event loop, closed at the end of the run)."""

    def __init__(self, ctx: Context, pki: BenchPki, m: _Material) -> None:
        from verifier.config import IdentityConfig, JwksConfig, LogConfig, VerifierConfig
        from verifier.middleware import AxidVerifier
        from verifier.revocation import StaticRevocations
        from verifier.rules import RouteRule

        d = ctx.tempdir("inproc-")
        config = VerifierConfig(
            service=SERVICE,
            issuer=ISS,
            tenants=("acme",),
            identity=IdentityConfig(bundle=(pki.bundle,)),
            jwks=JwksConfig(file=m.jwks_file),
            revocations=StaticRevocations(_REVOKED),
            log=LogConfig(url=f"sqlite:///{d}/verifier.db", key=d / "log.pem"),
            rules=(RouteRule(_RULE["path"], methods=("GET",), scope=_RULE["scope"]),),
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise AssertionError("not called")

        self.verifier = AxidVerifier(app, config)
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.verifier.startup())
        except BaseException:
            self.loop.close()
            raise
        ctx.on_close(self.close)
        pipeline = self.verifier.pipeline
        assert pipeline is not None
        self.pipeline = pipeline
        rule = config.rule_set.match("GET", PATH)
        if rule is None:
            raise BenchError("the benchmark route has no rule")
        self.rule = rule

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.verifier.shutdown())
        finally:
            self.loop.close()

    def presented(self, m: _Material, token: str) -> Any:
        """What the middleware would hand the pipeline for one request."""
        from verifier.checks import RequestInfo
        from verifier.pipeline import Presented

        headers = ((b"host", b"127.0.0.1:8443"), (b"user-agent", b"axid-bench"))
        return Presented(
            method="GET",
            path=PATH,
            tls_chain=list(m.chain_pem),
            client_ip="127.0.0.1",
            token=token,
            token_headers=1,
            xfcc=None,
            info=RequestInfo("GET", PATH, b"", headers, ("127.0.0.1", 50_000)),
        )

    def decide(self, presented: Any) -> Any:
        return _drive(self.pipeline.decide(presented, self.rule))


def _in_process(ctx: Context) -> tuple[_InProcess, _Material]:
    pki = bench_pki(ctx)
    m = _material(ctx, pki)
    ip = ctx.shared.get("verifier.inproc")
    if ip is None:
        ip = _InProcess(ctx, pki, m)
        ctx.shared["verifier.inproc"] = ip
    return ip, m


def _timing(ctx: Context) -> dict[str, Any]:
    if ctx.iterations is not None:
        return {"n": ctx.iterations, "repeat": 1}
    return {"seconds": 0.25 if ctx.quick else 1.0, "repeat": ctx.repeats()}


def _allowed(decision: Any, what: str) -> None:
    if not decision.allow:
        raise BenchError(f"{what}: the benchmark request was denied ({decision.reason})")


@register("token.verify_cached")
def token_verify_cached(ctx: Context) -> Result:
    """The pipeline's token step on a cache hit vs one bare Ed25519 verify.

    Measured: ``Pipeline._verify_token`` (the verifier's own step 2, private
    to the pipeline, so the figure follows its code): the JWKS source's
    current key set, the :class:`~verifier.pipeline.TokenCache` lookup (LRU,
    ``kid`` still in the key set) and the nbf/exp/iat re-check with leeway.
    The token was verified once before timing, as a repeated token is.
    """
    from verifier.pipeline import _Facts

    ip, m = _in_process(ctx)
    token = _token(m, "bench-cached-token")
    _allowed(ip.decide(ip.presented(m, token)), "token.verify_cached")  # now cached
    facts = _Facts(ip.rule, "GET", "/payments/p-1001", "payments")
    pipeline = ip.pipeline
    hits = pipeline.token_cache.hits
    claims = _drive(pipeline._verify_token(token, facts))
    if claims.run != "bench-cached-token" or pipeline.token_cache.hits != hits + 1:
        raise BenchError("token.verify_cached: the token step did not hit the cache")
    value, base = compare_rates(
        lambda: _drive(pipeline._verify_token(token, facts)),
        _ed25519_baseline(m, token),
        **_timing(ctx),
    )
    ctx.detail("token.verify_cached", "TokenCache hit + time checks")
    return Result.of("token.verify_cached", value, "ops/s", "Ed25519 verify (cryptography)", base)


@register("verifier.check_cached")
def verifier_check_cached(ctx: Context) -> Result:
    """``Pipeline.decide`` for a repeated token vs one bare Ed25519 verify.

    Measured: steps 1-7 of a governed ``GET /payments/p-1001`` as the middleware
    runs them, without HTTP and without the decision-log append: peer chain ->
    SPIFFE ID (the verifier's SVID cache), token (cache hit), ``sub`` and
    ``cnf`` binding (constant-time), audience and tenant, route rule and scope,
    revocation set match, the decision object. The human table adds the same
    with a fresh token per call (cache miss: full token verification).
    """
    ip, m = _in_process(ctx)
    token = _token(m, "bench-check-cached")
    presented = ip.presented(m, token)
    _allowed(ip.decide(presented), "verifier.check_cached")
    hits = ip.pipeline.token_cache.hits
    _allowed(ip.decide(presented), "verifier.check_cached")
    if ip.pipeline.token_cache.hits != hits + 1:
        raise BenchError("verifier.check_cached: the repeated token missed the cache")
    value, base = compare_rates(
        lambda: ip.decide(presented), _ed25519_baseline(m, token), **_timing(ctx)
    )

    # Cold: a fresh token per call (minted beforehand), each verified in full.
    k = ctx.n(full=2000, quick=400)
    fresh = [ip.presented(m, _token(m, f"bench-cold-{i:05d}")) for i in range(k)]
    _allowed(ip.decide(fresh[-1]), "verifier.check_cached (cold)")
    it = iter(fresh[:-1])
    cold = rate(lambda: ip.decide(next(it)), n=k - 1, repeat=1) if k > 1 else 0.0
    ctx.detail(
        "verifier.check_cached",
        f"cache hit; fresh token per call: {cold:,.0f} ops/s" if cold else "cache hit",
    )
    return Result.of("verifier.check_cached", value, "ops/s", "Ed25519 verify (cryptography)", base)


# --------------------------------------------------------------------------- governed HTTP


def governed_app(args: dict[str, Any]) -> tuple[Any, Any]:
    """Server factory: the bare routes behind AxidVerifier (config file ``args["config"]``)."""
    from bench.issuer import bare_fastapi
    from mtls.sources import FileSource
    from verifier.config import VerifierConfig
    from verifier.middleware import AxidVerifier

    app = AxidVerifier(bare_fastapi(), VerifierConfig.from_file(args["config"]))
    return app, FileSource(args["cert"], args["key"], args["bundle"])


def _governed_config(d: Path, pki: BenchPki, m: _Material) -> Path:
    """The verifier's YAML config (JSON is YAML): JWKS file, revocations read from an
    issuer database, decision log in SQLite."""
    from axid.issuer.store import IssuerStore

    revocations_url = f"sqlite:///{d}/issuer.db"
    store = IssuerStore.open(revocations_url)
    try:
        for kind, value in _REVOKED:
            store.revoke(kind, value, "bench", created_by=pki.spiffe_id("planner"), now_ms=0)
    finally:
        store.close()
    doc = {
        "service": SERVICE,
        "issuer": ISS,
        "tenants": ["acme"],
        "header": HEADER,
        "identity": {"bundle": str(pki.bundle)},
        "jwks": {"file": str(m.jwks_file)},
        "revocations": {"database_url": revocations_url},
        "log": {"url": f"sqlite:///{d}/verifier.db", "key": str(d / "log.pem")},
        "rules": [_RULE, {"path": "/healthz", "governed": False}],
    }
    path = d / "verifier.yaml"
    path.write_text(json.dumps(doc, indent=1))
    return path


@register("verifier.governed_rps")
def verifier_governed_rps(ctx: Context) -> Result:
    """Governed requests/s over mTLS, 32 keep-alive clients, repeated tokens.

    Measured: ``GET /payments/p-1001`` on a FastAPI app wrapped in
    ``AxidVerifier`` (config file: JWKS file, revocations polled from an issuer
    SQLite table, decision log in SQLite with WAL, ``synchronous=FULL`` and
    group commit) under uvicorn (httptools, uvloop) in its own process. Each
    request: steps 1-7 (token cache hit after each client's first request), the
    decision appended and committed (waited for), then the route. 32 clients in
    the benchmark process, each with its own token (own run), one request in
    flight each. Baseline: the same FastAPI app without the middleware, same
    request bytes (token header included), same server set-up. Self-check: the
    decision log holds exactly one entry per answered governed request.
    """
    pki = bench_pki(ctx)
    m = _material(ctx, pki)
    d, governed, bare = governed_servers(ctx, "governed")
    tokens = [_token(m, f"bench-run-{i:02d}") for i in range(GOVERNED_CLIENTS)]
    plan = http_plan(ctx, GOVERNED_CLIENTS)
    ssl_ctx = client_ssl(pki, client="planner", server="payments")
    answered = 0

    def requests(port: int) -> list[bytes]:
        return [http_request("GET", PATH, port, [(HEADER, t)]) for t in tokens]

    with serving(d, governed, bare) as (governed_port, bare_port):

        async def main() -> tuple[float, float]:
            nonlocal answered
            value = await LoadPool.open(
                "governed", governed_port, ssl_ctx, requests(governed_port), expect=200
            )
            try:
                base = await LoadPool.open(
                    "bare", bare_port, ssl_ctx, requests(bare_port), expect=200
                )
                try:
                    rates = await compare_pools(value, base, plan)
                finally:
                    base.close()
                answered = value.answered
                return rates
            finally:
                value.close()

        rate_, base_rate = run_client(main())
    entries = log_entries(d / "verifier.db", SERVICE)
    if entries != answered:
        raise BenchError(f"verifier.governed_rps: {answered} requests, {entries} log entries")
    ctx.detail(
        "verifier.governed_rps",
        f"{GOVERNED_CLIENTS} keep-alive mTLS clients, {entries:,} logged decisions",
    )
    return Result.of(
        "verifier.governed_rps",
        rate_,
        "ops/s",
        "the same FastAPI route without AxidVerifier",
        base_rate,
    )


# --------------------------------------------------------------------------- latency

_LATENCY_BLOCK: Final = 100  # requests per block; governed and bare blocks alternate
_MAX_HEAD: Final = 1 << 16


class SeqClient:
    """One keep-alive mTLS connection sending one pre-built request at a time.

    A blocking :mod:`ssl` socket with ``TCP_NODELAY``: the cheapest client there
    is, so that the time measured is the server's (and the loopback's).
    """

    def __init__(self, label: str, port: int, ssl_ctx: ssl.SSLContext, request: bytes) -> None:
        self.label = label
        self.request = request
        self.answered = 0
        self.last_body = b""
        raw = socket.create_connection((HOST, port), timeout=30)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = ssl_ctx.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        self._buf = bytearray()

    def once(self) -> None:
        """Send the request, read one Content-Length-framed answer, check it is a 200."""
        self.sock.sendall(self.request)
        while (answer := take_answer(self._buf, self.label, _MAX_HEAD)) is None:
            self._recv()
        status, body, extra = answer
        if extra:
            raise BenchError(f"{self.label}: more bytes than one answer")
        if status != b"200":
            detail = body[:300].decode("utf-8", "replace")
            raise BenchError(f"{self.label}: HTTP {status.decode('ascii', 'replace')} {detail}")
        self.answered += 1
        self.last_body = body

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError(f"{self.label}: the server closed the connection")
        self._buf += chunk

    def timed(self, n: int, out: list[float]) -> None:
        """``n`` requests, each one's seconds appended to ``out`` (gc paused)."""
        gc_was = gc.isenabled()
        gc.disable()
        try:
            clock, once = time.perf_counter, self.once
            for _ in range(n):
                t0 = clock()
                once()
                out.append(clock() - t0)
        finally:
            if gc_was:
                gc.enable()

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class _Latency:
    governed: list[float]  # seconds per request, in order
    bare: list[float]
    entries: int  # decisions in the log after the server stopped


def percentile(samples: list[float], q: int) -> float:
    """The ``q``-th percentile (1..99) of ``samples`` in microseconds."""
    if len(samples) < 2:
        return samples[0] * 1e6
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1e6


def governed_servers(ctx: Context, label: str) -> tuple[Path, tuple[Any, ...], tuple[Any, ...]]:
    """The temporary directory and :func:`serving` specs of the governed app and the bare
    app (the same as ``verifier.governed_rps``'s); the governed one logs to
    ``<dir>/verifier.db``."""
    pki = bench_pki(ctx)
    m = _material(ctx, pki)
    d = ctx.tempdir(f"{label}-")
    config = _governed_config(d, pki, m)
    svid = {"cert": str(pki.cert("payments")), "key": str(pki.key("payments"))}
    svid["bundle"] = str(pki.bundle)
    governed = ("governed", "bench.verifier:governed_app", {**svid, "config": str(config)})
    return d, governed, ("bare", "bench.issuer:bare_app", svid)


def _measure_latency(ctx: Context) -> _Latency:
    pki = bench_pki(ctx)
    m = _material(ctx, pki)
    d, governed, bare = governed_servers(ctx, "latency")
    token = _token(m, "bench-latency")
    ssl_ctx = client_ssl(pki, client="planner", server="payments")
    total = ctx.n(full=3000, quick=600)
    warmup = min(total, 300 if not ctx.quick else 100)
    times: dict[str, list[float]] = {"governed": [], "bare": []}
    with serving(d, governed, bare) as ports:
        clients = [
            SeqClient(label, port, ssl_ctx, http_request("GET", PATH, port, [(HEADER, token)]))
            for label, port in zip(times, ports, strict=True)
        ]
        try:
            for c in clients:  # handshake done; caches, log connection, first batches
                for _ in range(warmup):
                    c.once()
            done = 0
            while done < total:  # alternate blocks: a busy moment hits both figures
                k = min(_LATENCY_BLOCK, total - done)
                for c in clients:
                    c.timed(k, times[c.label])
                done += k
            answered = clients[0].answered
        finally:
            for c in clients:
                c.close()
    entries = log_entries(d / "verifier.db", SERVICE)
    if entries != answered:
        raise BenchError(f"verifier.latency: {answered} governed answers, {entries} log entries")
    return _Latency(times["governed"], times["bare"], entries)


def _latency(ctx: Context) -> _Latency:
    got = ctx.shared.get("verifier.latency")
    if got is None:
        got = _measure_latency(ctx)
        ctx.shared["verifier.latency"] = got
    return got  # type: ignore[no-any-return]


def _latency_result(ctx: Context, q: int) -> Result:
    """``verifier.latency_p{q}`` from the run's one latency measurement."""
    lat = _latency(ctx)
    name = f"verifier.latency_p{q}"
    other = 99 if q == 50 else 50
    ctx.detail(
        name,
        f"1 sequential keep-alive mTLS client, {len(lat.governed):,} requests each, "
        f"{lat.entries:,} logged decisions; p{other} {percentile(lat.governed, other):,.0f} µs "
        f"(bare {percentile(lat.bare, other):,.0f} µs)",
    )
    return Result.of(
        name,
        percentile(lat.governed, q),
        "µs/op",
        f"p{q} of the same FastAPI route without AxidVerifier",
        percentile(lat.bare, q),
    )


@register("verifier.latency_p50")
def verifier_latency_p50(ctx: Context) -> Result:
    """Median microseconds per governed request, one sequential keep-alive mTLS client.

    Measured: ``GET /payments/p-1001`` with one valid token (cache hit after
    the first request), allowed, its decision appended and committed (SQLite,
    WAL, ``synchronous=FULL``: one entry and one fsync per request, since the
    client waits for each answer) before the route answers; the servers are
    ``verifier.governed_rps``'s (uvicorn, httptools, uvloop, TCP_NODELAY, own
    process). The client: a blocking TLS socket with pre-built request bytes.
    After a warm-up, blocks of 100 governed and 100 bare requests alternate;
    every request is timed from the first byte sent to the last byte read.
    Self-check: the decision log holds one entry per governed answer.
    """
    return _latency_result(ctx, 50)


@register("verifier.latency_p99")
def verifier_latency_p99(ctx: Context) -> Result:
    """The 99th percentile of the same samples as ``verifier.latency_p50``."""
    return _latency_result(ctx, 99)
