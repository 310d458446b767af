"""Bad input against the live issuer (issue 6): schemathesis over its HTTP API,
oversized requests, slow clients.

Everything runs against the real app under uvicorn on 127.0.0.1:0 over mTLS with
the dev PKI (``tests/_issuer_helpers.py``), SQLite state. Contract checked on every
answer: never a 5xx (503 ``audit_unavailable`` included: the log is healthy here),
and every 4xx is ``application/problem+json`` with ``status`` equal to the HTTP
status and a ``reason`` from DESIGN.md's codes or the issuer's own
(:data:`axid.issuer.problems.ISSUER_REASONS`).

Schemathesis. The issuer serves no OpenAPI document of its own (``openapi_url=None``,
and its handlers read the raw request, so FastAPI's generated document has no
request bodies or parameters). :func:`_issuer_openapi` therefore takes the app's
route list from ``app.openapi()`` and adds what the contract says: the request
bodies of ``POST /v1/tokens`` / ``POST /v1/revocations``, the query of ``GET
/v1/revocations`` and the answers (problem+json for every 4xx). The request
schemas are never *tighter* than the issuer for the peer that sends them (the
registered planner, an admin, an unregistered workload): schemathesis' negative
mode then only produces requests the issuer must refuse. Cases are drawn with
``operation.as_strategy`` (fuzzing) and ``schema.iter_coverage_cases`` (coverage
phase) and sent with ``case.call`` through a ``requests`` session whose adapter
carries the mTLS context (schemathesis' lazy pytest fixture integration does not
work under pytest 9).

Oversized requests and slow clients run against both uvicorn protocols the issuer
offers (``http: h11 | httptools``): ``mtls.uvicorn``'s request-head limits
(``HttpLimits``: 32 KiB head, 8 KiB target, 100 header fields) must refuse the same
way under both, as problem+json, whether the head arrives in one write or in parts.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import io
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import pytest
import requests
import schemathesis
from _issuer_helpers import World, make_world, running
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from axid.issuer.problems import ISSUER_REASONS, PROBLEM_MEDIA_TYPE
from axid.issuer.schemas import MAX_BODY_BYTES
from axid.tokens import REASONS as TOKEN_REASONS
from mtls.tlsconfig import client_context

# Reason codes of DESIGN.md ("Reason codes") that the issuer may answer with.
DESIGN_REASONS: Final = frozenset(
    {
        "no_peer_cert",
        "peer_untrusted",
        "peer_not_svid",
        "tenant_not_allowed",
        "agent_not_allowed",
        "scope_insufficient",
        "revoked",
    }
)
ALLOWED_REASONS: Final = (DESIGN_REASONS | ISSUER_REASONS | set(TOKEN_REASONS)) - {"ok"}
REQUEST_TIMEOUT: Final = 10.0  # seconds; a bound for "still serving", not a latency check


# --------------------------------------------------------------------------- the live issuer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("bad-input"), "sqlite")
    with running(w):
        yield w


def assert_problem(status: int, ctype: str, body: bytes) -> dict[str, Any]:
    """The RFC 9457 answer every refusal must be."""
    assert 400 <= status < 500, (status, body[:300])
    assert ctype.split(";")[0].strip() == PROBLEM_MEDIA_TYPE, (status, ctype)
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    assert doc.get("status") == status, doc
    assert doc.get("reason") in ALLOWED_REASONS, doc
    assert doc.get("type") == "about:blank", doc
    assert isinstance(doc.get("title"), str) and isinstance(doc.get("detail"), str), doc
    return doc


def assert_healthy(w: World) -> None:
    """The issuer still answers, over a fresh connection, and still mints."""
    ctx = client_context(w.source("planner"), server_id=w.pki.spiffe_id("issuer"))
    with httpx.Client(
        base_url=w.url, verify=ctx, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.post("/v1/tokens", json=w.root_body())
        assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- OpenAPI


class _MtlsAdapter(HTTPAdapter):
    """requests adapter whose connections use an mTLS ``SSLContext`` from
    :func:`mtls.tlsconfig.client_context` (SVID presented, server SPIFFE ID checked
    after the handshake; DNS names are not the server's identity)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)


def mtls_session(w: World, name: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(w.pki.bundle)  # the same CA the context trusts already
    ctx = client_context(w.source(name), server_id=w.pki.spiffe_id("issuer"))
    session.mount("https://", _MtlsAdapter(ctx))
    return session


_PROBLEM_SCHEMA: Final = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "reason"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 499},
        "detail": {"type": "string"},
        "reason": {"enum": sorted(ALLOWED_REASONS)},
    },
}
_PROBLEM: Final = {
    "description": "refused (RFC 9457)",
    "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_SCHEMA}},
}
_UNAUTHENTICATED: Final = {
    **_PROBLEM,
    "headers": {
        "WWW-Authenticate": {
            "required": True,
            "schema": {"type": "string", "pattern": '^AXID error="[a-z_]+"$'},
        }
    },
}


def _json_answer(schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": "ok", "content": {"application/json": {"schema": schema}}}


def _text_answer() -> dict[str, Any]:
    return {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}


_APPROVAL: Final = {
    "type": "object",
    "required": ["id", "status", "req", "expires_at"],
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"},
        "status": {"enum": ["pending", "approved", "denied", "expired"]},
    },
}
_APPROVAL_FILED: Final = {
    "type": "object",
    "required": ["id", "status", "expires_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"},
        "status": {"const": "pending"},
        "expires_at": {"type": "integer"},
    },
}
_APPROVAL_LIST: Final = {
    "type": "object",
    "required": ["approvals"],
    "additionalProperties": False,
    "properties": {"approvals": {"type": "array", "items": _APPROVAL}},
}
_REVOCATION: Final = {
    "type": "object",
    "required": ["seq", "kind", "value", "reason", "created_at"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "kind": {"enum": ["jti", "run", "agent", "tenant"]},
        "value": {"type": "string"},
        "reason": {"type": "string"},
        "created_at": {"type": "string"},
    },
}
_SUCCESS: Final[dict[tuple[str, str], tuple[str, dict[str, Any]]]] = {
    ("/v1/tokens", "post"): (
        "201",
        _json_answer(
            {
                "type": "object",
                "required": ["token", "jti", "kid", "expires_at"],
                "additionalProperties": False,
                "properties": {
                    "token": {
                        "type": "string",
                        "pattern": r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){2}$",
                    },
                    "jti": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"},
                    "kid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
                    "expires_at": {"type": "integer"},
                },
            }
        ),
    ),
    ("/.well-known/jwks.json", "get"): (
        "200",
        _json_answer(
            {
                "type": "object",
                "required": ["keys"],
                "properties": {"keys": {"type": "array", "minItems": 1}},
            }
        ),
    ),
    ("/v1/revocations", "post"): (
        "201",
        _json_answer(
            {
                **_REVOCATION,
                "required": [*_REVOCATION["required"], "cascaded"],
                "properties": {
                    **_REVOCATION["properties"],
                    "cascaded": {"type": "array", "items": _REVOCATION},
                },
            }
        ),
    ),
    ("/v1/revocations", "get"): (
        "200",
        _json_answer(
            {
                "type": "object",
                "required": ["revocations", "next"],
                "additionalProperties": False,
                "properties": {
                    "revocations": {"type": "array", "items": _REVOCATION},
                    "next": {"type": "integer", "minimum": 0},
                },
            }
        ),
    ),
    ("/v1/audit/checkpoint", "get"): ("200", _text_answer()),
    ("/v1/audit/proof", "get"): ("200", _text_answer()),
    ("/v1/audit/consistency", "get"): ("200", _text_answer()),
    ("/healthz", "get"): ("200", _json_answer({"const": {"status": "ok"}})),
    ("/metrics", "get"): ("200", _text_answer()),
    # Approvals (axid.issuer.approvals): this world configures no approvals section, so
    # nobody may file and nobody approves; every peer here is refused (403/404).
    ("/v1/approvals", "post"): ("201", _json_answer(_APPROVAL_FILED)),
    ("/v1/approvals", "get"): ("200", _json_answer(_APPROVAL_LIST)),
    ("/v1/approvals/{approval_id}", "get"): ("200", _json_answer(_APPROVAL)),
    ("/v1/approvals/{approval_id}/decision", "post"): ("200", _json_answer(_APPROVAL)),
}

# Scope tokens of the planner's registration (tests/_issuer_helpers.py).
_PLANNER_SCOPE_TOKENS: Final = (
    "payments:read",
    "payments:refund",
    "payments:delete",
    "ledger:read",
)
_RUN_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_SLUG_PATTERN: Final = "^[a-z0-9][a-z0-9-]{0,62}$"


def _mint_body(w: World) -> dict[str, Any]:
    """What the planner may send (the issuer refuses everything outside it)."""
    token = "(" + "|".join(t.replace(".", r"\.") for t in _PLANNER_SCOPE_TOKENS) + ")"
    return {
        "type": "object",
        "required": ["agent", "run", "audience", "scope"],
        "additionalProperties": False,
        "properties": {
            "agent": {"enum": [w.planner]},
            "run": {"type": "string", "pattern": _RUN_PATTERN},
            "audience": {
                "anyOf": [
                    {"enum": ["payments", "ledger"]},
                    {
                        "type": "array",
                        "items": {"enum": ["payments", "ledger"]},
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                ]
            },
            # Duplicated tokens match this but are refused: looser than the issuer is fine.
            "scope": {"type": "string", "pattern": f"^{token}( {token}){{0,3}}$"},
            "parent_token": {"type": ["string", "null"], "maxLength": 65536},
            "ttl_seconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 300},
            "tenant": {"enum": [w.tenant, None]},
        },
    }


def _revocation_body() -> dict[str, Any]:
    value_rules = {
        "jti": "^[A-Za-z0-9_-]{22}$",
        "run": _RUN_PATTERN,
        "agent": _SLUG_PATTERN,
        "tenant": _SLUG_PATTERN,
    }
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["kind", "value", "reason"],
                "additionalProperties": False,
                "properties": {
                    "kind": {"const": kind},
                    "value": {"type": "string", "pattern": pattern},
                    # The issuer wants str.isprintable(); JSON Schema cannot say that, so
                    # this is looser (positive cases with control characters get 400).
                    "reason": {"type": "string", "minLength": 1, "maxLength": 512},
                },
            }
            for kind, pattern in value_rules.items()
        ]
    }


def _issuer_openapi(w: World) -> dict[str, Any]:
    doc = copy.deepcopy(w.app.openapi())
    doc["openapi"] = "3.1.0"
    # FastAPI documents only its own routes; plain Starlette routes (the issuer's
    # hot POST /v1/tokens) are added from the app's route table so none is missed.
    for route in w.app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            ops = doc["paths"].setdefault(route.path, {})
            for method in route.methods or ():
                if method != "HEAD":
                    ops.setdefault(method.lower(), {"responses": {}})
    routes = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    # A new route must be described here before this test passes again.
    assert routes == set(_SUCCESS), routes ^ set(_SUCCESS)
    for (path, method), (code, answer) in _SUCCESS.items():
        op = doc["paths"][path][method]
        op["responses"] = {code: answer, "401": _UNAUTHENTICATED, "4XX": _PROBLEM}
    doc["paths"]["/v1/tokens"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": _mint_body(w)}},
    }
    doc["paths"]["/v1/revocations"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": _revocation_body()}},
    }
    for path, first in (("/v1/audit/proof", "seq"), ("/v1/audit/consistency", "old")):
        doc["paths"][path]["get"]["parameters"] = [
            {"name": first, "in": "query", "required": True, "schema": _LOG_INT},
            {"name": "size", "in": "query", "required": False, "schema": _LOG_INT},
        ]
    doc["paths"]["/v1/revocations"]["get"]["parameters"] = [
        {
            "name": "since",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
    ]
    return doc


# Sizes and indexes of the log's read routes (verifier.logroutes: strict decimal, 63 bits).
_LOG_INT: Final = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

# 413 (body over MAX_BODY_BYTES) is a fine refusal of schema-violating data too.
_REFUSALS: Final = ["400", "401", "403", "404", "405", "409", "413", "415", "422"]


@pytest.fixture(scope="module")
def api(world: World) -> schemathesis.BaseSchema:
    # An explicit config: no schemathesis.toml from the environment changes this test.
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": _REFUSALS}}}
    )
    return schemathesis.openapi.from_dict(_issuer_openapi(world), config=config)


_BODY_OPS: Final = [("POST", "/v1/tokens"), ("POST", "/v1/revocations"), ("GET", "/v1/revocations")]
_PLAIN_OPS: Final = [
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/v1/approvals"),
    ("POST", "/v1/approvals"),
    ("GET", "/v1/approvals/{approval_id}"),
    ("POST", "/v1/approvals/{approval_id}/decision"),
    ("GET", "/v1/audit/checkpoint"),
    ("GET", "/v1/audit/proof"),
    ("GET", "/v1/audit/consistency"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]
# The registered agent, an admin (registered for nothing), and a valid SVID of the
# trust domain that no registration names.
_PEERS: Final = ("planner", "admin", "stranger")
_CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
_FUZZ_EXAMPLES: Final = 50


def _call_and_check(case: schemathesis.Case, w: World, session: requests.Session) -> int:
    response = case.call(base_url=w.url, session=session, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=_CHECKS)
    if response.status_code >= 400:
        ctype = response.headers.get("content-type", [""])[0]
        assert_problem(response.status_code, ctype, response.content)
    return response.status_code


@pytest.mark.parametrize(
    ("peer", "method", "path"),
    [(peer, m, p) for peer in _PEERS for m, p in _BODY_OPS + _PLAIN_OPS],
    ids=lambda v: str(v),
)
def test_schemathesis_coverage(
    world: World, api: schemathesis.BaseSchema, peer: str, method: str, path: str
) -> None:
    """Schemathesis' coverage phase: boundary values, missing and wrong-typed members,
    other content types, other methods; both generation modes. Deterministic."""
    operation = api[path][method]
    generation = api.config.generation_for(operation=operation, phase="coverage")
    statuses: set[int] = set()
    with mtls_session(world, peer) as session:
        for case in api.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=generation
        ):
            statuses.add(_call_and_check(case, world, session))
    assert statuses, "the coverage phase produced no request"


@pytest.mark.parametrize(
    ("peer", "method", "path", "mode", "examples"),
    [
        (peer, m, p, mode, _FUZZ_EXAMPLES)
        for peer in _PEERS
        for m, p in _BODY_OPS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    + [
        (peer, m, p, GenerationMode.POSITIVE, 3)
        for peer in ("planner", "stranger")
        for m, p in _PLAIN_OPS
    ],
    ids=lambda v: str(v.value) if isinstance(v, GenerationMode) else str(v),
)
def test_schemathesis_fuzz(
    world: World,
    api: schemathesis.BaseSchema,
    peer: str,
    method: str,
    path: str,
    mode: GenerationMode,
    examples: int,
) -> None:
    """Schemathesis' fuzzing phase (hypothesis, derandomized): schema-conforming
    requests (positive) and requests that break the schema (negative)."""
    operation = api[path][method]
    with mtls_session(world, peer) as session:

        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            statuses.add(_call_and_check(case, world, session))

        statuses: set[int] = set()
        check()
    if mode is GenerationMode.POSITIVE and (peer, method, path) in _SUCCEEDS:
        # The schemas describe what this peer may do: some requests must go through,
        # so the signing / storing paths are exercised, not only the refusals.
        assert _SUCCEEDS[peer, method, path] in statuses, statuses


_SUCCEEDS: Final = {
    ("planner", "POST", "/v1/tokens"): 201,
    ("admin", "POST", "/v1/revocations"): 201,
    ("planner", "GET", "/v1/revocations"): 200,
    ("planner", "GET", "/.well-known/jwks.json"): 200,
}


def test_revocations_since_upper_bound(world: World) -> None:
    client = world.client("planner")
    for since in (10**15, 2**53 - 1):  # 16 digits
        r = client.get("/v1/revocations", params={"since": str(since)})
        assert r.status_code == 200, r.text
        assert r.json()["revocations"] == []
    r = client.get("/v1/revocations", params={"since": "0" * 15 + "1"})  # 16 with zeros
    assert r.status_code == 200, r.text
    for since in (2**53, 10**16, "00009007199254740991"):  # over the range / 17+ digits
        r = client.get("/v1/revocations", params={"since": str(since)})
        doc = assert_problem(r.status_code, r.headers["content-type"], r.content)
        assert (r.status_code, doc["reason"]) == (400, "bad_request")


# --------------------------------------------------------------------------- raw requests


@pytest.fixture(scope="module")
def world_httptools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("bad-input-httptools"), "sqlite")
    with running(w, http="httptools"):
        yield w


def served(request: pytest.FixtureRequest, proto: str) -> World:
    """The module's live issuer with uvicorn's ``h11`` or ``httptools`` protocol."""
    return request.getfixturevalue("world" if proto == "h11" else "world_httptools")


def tls_connect(w: World, name: str = "planner") -> ssl.SSLSocket:
    """A completed mTLS connection presenting workload ``name``'s SVID."""
    ctx = client_context(w.source(name), server_id=w.pki.spiffe_id("issuer"))
    raw = socket.create_connection(("127.0.0.1", w.server.port), timeout=REQUEST_TIMEOUT)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


@dataclass
class Answer:
    status: int | None  # None: the server closed the connection without an answer
    content_type: str
    body: bytes
    sent: int  # request bytes written before the server stopped reading (or all of them)


class _Replay(io.RawIOBase):
    """A socket's byte stream with bytes already read put back in front."""

    def __init__(self, prefix: bytes, sock: ssl.SSLSocket) -> None:
        self._prefix = prefix
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)

    def makefile(self, _mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)


def exchange(
    w: World, head: bytes, body: Iterable[bytes] = (), *, pause_after: int | None = None
) -> Answer:
    """Send one raw HTTP/1.1 request over mTLS and read the answer.

    With ``pause_after``, only that many bytes are sent first; the rest follows only if
    no answer has come within _FIRST_PART_WAIT. That makes size limits testable: a
    server that refuses a request head once it has buffered more than its limit does
    so on the first part, whatever the TCP/TLS segmentation of the whole.
    """
    with tls_connect(w) as sock:
        sent, early = 0, b""
        parts = [head, *body]
        if pause_after is not None:
            parts = [head[:pause_after], head[pause_after:], *body]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            # The server may answer and stop reading before the request is complete.
            for n, part in enumerate(parts):
                sock.sendall(part)
                sent += len(part)
                if n == 0 and pause_after is not None:
                    sock.settimeout(_FIRST_PART_WAIT)
                    with contextlib.suppress(TimeoutError):
                        early = sock.recv(1) or b"\0"  # b"\0": closed, no answer
                    sock.settimeout(REQUEST_TIMEOUT)
                    if early:
                        break
        if early == b"\0":
            return Answer(None, "", b"", sent)
        response = http.client.HTTPResponse(_Replay(early, sock))  # type: ignore[arg-type]
        try:
            response.begin()
            data = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLEOFError):
            return Answer(None, "", b"", sent)
        return Answer(response.status, response.getheader("content-type") or "", data, sent)


_FIRST_PART_WAIT: Final = 2.5  # seconds; only decides whether the rest is sent at all


# A large head is sent in one write (under h11 alone, a head that came in one read
# was parsed whole and accepted), or first 40 KiB of it and the rest only if no answer
# came (the server reads an incomplete head over the 32 KiB limit): the same answer.
_SPLITS: Final = {"whole": None, "paused": 40 * 1024}


def request_head(
    method: str, target: str, *, length: int | None = None, extra: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: issuer.axid.test"]
    if length is not None:
        lines += [b"Content-Type: application/json", f"Content-Length: {length}".encode()]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def mint_request(w: World, *, extra: bytes = b"", target: str = "/v1/tokens") -> bytes:
    body = json.dumps(w.root_body()).encode()
    return request_head("POST", target, length=len(body), extra=extra) + body


_TEN_MIB: Final = 10 * 1024 * 1024
_CHUNK: Final = b"a" * 65536
_PROTOS: Final = ["h11", "httptools"]


# --------------------------------------------------------------------------- oversized


@pytest.mark.parametrize("proto", _PROTOS)
def test_10_mib_body_with_content_length(request: pytest.FixtureRequest, proto: str) -> None:
    w = served(request, proto)
    head = request_head("POST", "/v1/tokens", length=_TEN_MIB)
    answer = exchange(w, head, [_CHUNK] * (_TEN_MIB // len(_CHUNK)))
    # Refused from the Content-Length alone, before any of the body is read.
    doc = assert_problem(answer.status or 0, answer.content_type, answer.body)
    assert (answer.status, doc["reason"]) == (413, "bad_request")
    assert_healthy(w)


@pytest.mark.parametrize("proto", _PROTOS)
def test_10_mib_chunked_body(request: pytest.FixtureRequest, proto: str) -> None:
    w = served(request, proto)
    head = request_head(
        "POST",
        "/v1/tokens",
        extra=b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    )
    chunk = b"%x\r\n%s\r\n" % (len(_CHUNK), _CHUNK)
    answer = exchange(w, head, [chunk] * (_TEN_MIB // len(_CHUNK)) + [b"0\r\n\r\n"])
    # No length up front: refused once more than MAX_BODY_BYTES have arrived.
    doc = assert_problem(answer.status or 0, answer.content_type, answer.body)
    assert (answer.status, doc["reason"]) == (413, "bad_request")
    assert_healthy(w)


def test_body_size_limit_boundary(world: World) -> None:
    body = json.dumps(world.root_body()).encode()
    padded = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"  # JSON whitespace
    assert len(padded) == MAX_BODY_BYTES
    answer = exchange(world, request_head("POST", "/v1/tokens", length=len(padded)) + padded)
    assert answer.status == 201, answer.body[:300]
    over = padded[:-1] + b" }"
    answer = exchange(world, request_head("POST", "/v1/tokens", length=len(over)) + over)
    assert assert_problem(answer.status or 0, answer.content_type, answer.body)["status"] == 413


@pytest.mark.parametrize("proto", _PROTOS)
def test_9_kib_parent_token(request: pytest.FixtureRequest, proto: str) -> None:
    w = served(request, proto)
    body = w.root_body(parent_token="eyJ" + "A" * (9 * 1024))
    r = w.mint("planner", **body)
    doc = assert_problem(r.status_code, r.headers["content-type"], r.content)
    assert (r.status_code, doc["reason"]) == (401, "token_too_large")
    assert_healthy(w)


def assert_refused(answer: Answer, status: int) -> None:
    doc = assert_problem(answer.status or 0, answer.content_type, answer.body)
    assert (answer.status, doc["reason"]) == (status, "bad_request"), doc


@pytest.mark.parametrize("split", _SPLITS)
@pytest.mark.parametrize("proto", _PROTOS)
def test_100_kib_header(request: pytest.FixtureRequest, proto: str, split: str) -> None:
    w = served(request, proto)
    big = mint_request(w, extra=b"X-Big: " + b"a" * 100 * 1024 + b"\r\n")
    assert_refused(exchange(w, big, pause_after=_SPLITS[split]), 431)
    assert_healthy(w)


@pytest.mark.parametrize("proto", _PROTOS)
def test_1000_headers(request: pytest.FixtureRequest, proto: str) -> None:
    w = served(request, proto)
    many = b"".join(b"X-H-%d: v\r\n" % i for i in range(1000))  # ~12 KB in all
    assert_refused(exchange(w, mint_request(w, extra=many)), 431)
    assert_healthy(w)


@pytest.mark.parametrize("proto", _PROTOS)
def test_header_limits_boundary(request: pytest.FixtureRequest, proto: str) -> None:
    """100 header fields in a head of exactly 32 KiB mint; one byte or one field more
    is refused."""
    w = served(request, proto)
    body = json.dumps(w.root_body()).encode()
    base = request_head("POST", "/v1/tokens", length=len(body))  # 3 header fields
    fields = [b"X-H-%02d: v\r\n" % i for i in range(96)]
    pad = 32 * 1024 - len(base) - len(b"".join(fields)) - len(b"X-Pad: \r\n")
    head = request_head(
        "POST",
        "/v1/tokens",
        length=len(body),
        extra=b"".join(fields) + b"X-Pad: " + b"p" * pad + b"\r\n",
    )
    assert len(head) == 32 * 1024 and head.count(b"\r\n") - 2 == 100
    assert exchange(w, head + body).status == 201
    over = head.replace(b"X-Pad: ", b"X-Pad: p", 1)
    assert_refused(exchange(w, over + body), 431)
    one_more = head.replace(b"X-Pad: " + b"p" * 10, b"X-One: v\r\nX-Pad: ", 1)
    assert len(one_more) == len(head)
    assert_refused(exchange(w, one_more + body), 431)
    assert_healthy(w)


@pytest.mark.parametrize("split", _SPLITS)
@pytest.mark.parametrize("proto", _PROTOS)
def test_64_kib_url(request: pytest.FixtureRequest, proto: str, split: str) -> None:
    w = served(request, proto)
    # Minted every time under h11 before the limits when the head came in one read.
    for target in ("/v1/tokens?" + "a" * 65536, "/v1/" + "a" * 65536):
        answer = exchange(w, mint_request(w, target=target), pause_after=_SPLITS[split])
        assert_refused(answer, 414)
    assert_healthy(w)


@pytest.mark.parametrize("proto", _PROTOS)
def test_9_kib_url(request: pytest.FixtureRequest, proto: str) -> None:
    """Over the 8 KiB target limit but well inside the head limit: 414 too."""
    w = served(request, proto)
    assert_refused(exchange(w, mint_request(w, target="/v1/tokens?" + "a" * 9 * 1024)), 414)
    assert_healthy(w)


@pytest.mark.parametrize("proto", _PROTOS)
@pytest.mark.parametrize(
    ("what", "status"), [("100 KiB header", 431), ("64 KiB URL", 414), ("bad request line", 400)]
)
def test_protocol_level_refusals_are_problem_json(
    request: pytest.FixtureRequest, proto: str, what: str, status: int
) -> None:
    w = served(request, proto)
    raw = {
        "100 KiB header": mint_request(w, extra=b"X-Big: " + b"a" * 100 * 1024 + b"\r\n"),
        "64 KiB URL": mint_request(w, target="/v1/" + "a" * 65536),
        "bad request line": b"POST /v1/tokens HTTP/1.1 junk\r\nHost: x\r\n\r\n",
    }[what]
    assert_refused(exchange(w, raw), status)


@pytest.mark.parametrize("proto", _PROTOS)
def test_8_mib_header_and_100000_headers(request: pytest.FixtureRequest, proto: str) -> None:
    """Refused once the first 32 KiB have come; the rest is never parsed (the answer
    comes while the client is still sending: it pauses after 64 KiB to read it)."""
    w = served(request, proto)
    for extra in (
        b"X-Big: " + b"a" * 8 * 1024 * 1024 + b"\r\n",
        b"".join(b"X-H-%d: v\r\n" % i for i in range(100_000)),
    ):
        assert_refused(exchange(w, mint_request(w, extra=extra), pause_after=64 * 1024), 431)
    assert_healthy(w)


# --------------------------------------------------------------------------- slow clients

_SLOW_HEAD: Final = (
    b"POST /v1/tokens HTTP/1.1\r\nHost: issuer.axid.test\r\nContent-Type: application/json\r\n"
    b"X-Slow: " + b"a" * 200
)


@dataclass
class _SlowClients:
    """Connections that hold server resources without ever completing a request."""

    stop: threading.Event = field(default_factory=threading.Event)
    sent: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def trickle(self, w: World, name: str, first: bytes, drip: bytes) -> None:
        """After the TLS handshake, send ``first`` then one byte of ``drip`` per 0.5 s."""

        def run() -> None:
            try:
                with tls_connect(w, "worker") as sock:
                    sock.sendall(first)
                    for byte in drip:
                        if self.stop.wait(0.5):
                            return
                        sock.sendall(bytes([byte]))
                        with self.lock:
                            self.sent[name] = self.sent.get(name, 0) + 1
            except OSError as exc:  # the test asserts there are none
                with self.lock:
                    self.errors.append(f"{name}: {exc!r}")

        thread = threading.Thread(target=run, daemon=True, name=f"slow-{name}")
        self.sent[name] = 0
        self.threads.append(thread)
        thread.start()

    def hold_tcp(self, w: World, first: bytes = b"") -> None:
        """A TCP connection that never completes (or never starts) the TLS handshake."""
        sock = socket.create_connection(("127.0.0.1", w.server.port), timeout=REQUEST_TIMEOUT)
        self.sockets.append(sock)
        if first:
            sock.sendall(first)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT)
        for sock in self.sockets:
            sock.close()


@pytest.mark.parametrize("proto", _PROTOS)
def test_slow_clients_do_not_block_others(request: pytest.FixtureRequest, proto: str) -> None:
    w = served(request, proto)
    slow = _SlowClients()
    try:
        for i in range(20):  # slowloris: the request head, one byte per 0.5 s
            slow.trickle(w, f"head-{i}", b"", _SLOW_HEAD)
        for i in range(5):  # a complete head, then the body one byte per 0.5 s
            body = json.dumps(w.root_body()).encode()
            head = request_head("POST", "/v1/tokens", length=len(body))
            slow.trickle(w, f"body-{i}", head, body)
        for _ in range(10):
            slow.hold_tcp(w)  # connected, TLS never started
        for _ in range(5):
            slow.hold_tcp(w, b"\x16\x03\x01\x02")  # a TLS record header, then nothing

        # Meanwhile a normal client keeps minting, over new connections and over one
        # kept-alive connection, until every slow client has dripped a few bytes.
        minted = 0
        deadline = time.monotonic() + 60  # a hang guard only
        keep_alive = w.client("planner")
        while min(slow.sent.values()) < 4 or minted < 10:
            assert time.monotonic() < deadline, ("slow clients stalled", slow.sent, slow.errors)
            ctx = client_context(w.source("planner"), server_id=w.pki.spiffe_id("issuer"))
            with httpx.Client(
                base_url=w.url, verify=ctx, timeout=REQUEST_TIMEOUT, trust_env=False
            ) as fresh:
                for client in (fresh, keep_alive):
                    r = client.post("/v1/tokens", json=w.root_body())
                    assert r.status_code == 201, r.text
                    minted += 1
        assert not slow.errors, slow.errors
    finally:
        slow.close()
    assert_healthy(w)
