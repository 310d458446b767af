"""Agent-side client of the issuer service, over SPIFFE mTLS (httpx).

The client presents its workload's X.509-SVID (from any :class:`~mtls.sources.X509Source`)
and accepts only an issuer whose SVID verifies against the same bundles and whose
SPIFFE ID matches ``issuer_id`` (default ``spiffe://<own trust domain>/axid/issuer``).

The issuer URL must be ``https://HOST[:PORT][/PATH]`` (:func:`check_issuer_url`): over
``http://`` the mTLS context would go unused, the request and any parent token would
travel in cleartext and the token would come from an unauthenticated server. Userinfo,
a query or a fragment in the base URL are refused as well (they would be sent, or
silently dropped, on every request).

Refusals become :class:`IssuerError` with the problem's ``status``, ``reason`` and
``detail``; a connection or TLS failure has ``status=None`` and reason
``issuer_unreachable``, an answer that is not what the API promises reason
``bad_response``.

Receipts: the issuer answers every recorded decision with an ``AXID-Receipt``
header (:class:`~axid.audit.receipt.Receipt`). :meth:`IssuerClient.mint` returns it
as ``MintResult.receipt`` (``None`` only from an issuer that sends none; a malformed
one is a ``bad_response``: evidence the caller keeps must hold together), and a
recorded refusal's is ``IssuerError.receipt`` (``None`` if absent or malformed: the
refusal is raised either way). Parsing checks the form and that the leaf is the
entry's hash, not the checkpoint's signature: that is the auditor's
(``axid audit receipt check``).
"""

from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from axid.audit.receipt import RECEIPT_HEADER, Receipt, ReceiptError
from axid.issuer.errors import IssuerBaseError
from axid.keys import KeySet
from mtls.sources import X509Source
from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern
from mtls.tlsconfig import client_context

__all__ = [
    "DEFAULT_ISSUER_PATH",
    "AsyncIssuerClient",
    "IssuerClient",
    "IssuerError",
    "MintResult",
    "check_issuer_url",
    "issuer_id_matcher",
]

DEFAULT_ISSUER_PATH: Final = "/axid/issuer"
_MAX_DETAIL: Final = 500
_MAX_URL: Final = 2048
# Printable ASCII without space or backslash: WHATWG URL parsers read a backslash as
# "/", urllib does not; refusing it avoids a parser differential on the host.
_URL_CHARS: Final = re.compile(r"[\x21-\x5b\x5d-\x7e]+")


class IssuerError(IssuerBaseError):
    """The issuer refused, or could not be reached. ``reason`` is a stable code;
    ``receipt`` is the recorded refusal's receipt, when the issuer sent one."""

    status: int | None
    reason: str
    detail: str
    receipt: Receipt | None

    def __init__(
        self, status: int | None, reason: str, detail: str, *, receipt: Receipt | None = None
    ) -> None:
        prefix = "" if status is None else f"{status} "
        super().__init__(f"{prefix}{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.receipt = receipt


@dataclass(frozen=True)
class MintResult:
    """A minted token (``repr`` leaves the token out) and the receipt of its mint."""

    token: str = field(repr=False)
    jti: str
    kid: str
    expires_at: int
    receipt: Receipt | None = field(default=None, repr=False)


def check_issuer_url(url: str) -> str:
    """Return ``url`` if it is an acceptable issuer base URL, else raise ValueError.

    Accepted: scheme ``https`` (any case), a non-empty host, an optional port in
    1-65535 and an optional path. Refused: any other scheme (``http`` included),
    userinfo (``user:pass@``), a query or fragment (even empty), whitespace, control
    or non-ASCII characters, backslashes, more than 2048 characters.
    """
    if not isinstance(url, str):
        raise TypeError(f"the issuer URL must be a str, not {type(url).__name__}")
    if len(url) > _MAX_URL:
        raise ValueError(f"the issuer URL is longer than {_MAX_URL} characters")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() != "https":
        raise ValueError(
            "the issuer URL must be https://HOST[:PORT]: the token and any parent token"
            " are credentials and are only sent over mutually authenticated TLS"
        )
    if _URL_CHARS.fullmatch(url) is None:
        raise ValueError(
            "the issuer URL contains whitespace, control, non-ASCII or backslash characters"
        )
    if "?" in url or "#" in url:
        raise ValueError("the issuer URL must not have a query or a fragment")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ValueError(f"the issuer URL is malformed: {exc}") from None
    if "@" in parts.netloc:
        raise ValueError("the issuer URL must not carry userinfo (user:password@)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the issuer URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError("the issuer URL has no host")
    if port == 0:
        raise ValueError("the issuer URL has an invalid port")
    return url


def issuer_id_matcher(
    issuer_id: SpiffeId | SpiffeIdPattern | str | None, source: X509Source
) -> SpiffeId | SpiffeIdPattern:
    """The expected issuer identity: given (an ID or pattern) or the default
    ``spiffe://<the source's trust domain>/axid/issuer``."""
    if isinstance(issuer_id, SpiffeId | SpiffeIdPattern):
        return issuer_id
    if issuer_id is None:
        td = source.svid().spiffe_id.trust_domain
        return SpiffeId(td, DEFAULT_ISSUER_PATH)
    if not isinstance(issuer_id, str):
        raise TypeError("issuer_id must be a SpiffeId, SpiffeIdPattern, str or None")
    try:
        return SpiffeIdPattern.parse(issuer_id)
    except SpiffeIdError as exc:
        raise ValueError(f"invalid issuer SPIFFE ID: {exc}") from None


def _mint_body(
    agent: str,
    run: str,
    audience: str | list[str],
    scope: str,
    parent_token: str | None,
    ttl_seconds: int | None,
    tenant: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"agent": agent, "run": run, "audience": audience, "scope": scope}
    if parent_token is not None:
        body["parent_token"] = parent_token
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if tenant is not None:
        body["tenant"] = tenant
    return body


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        raise IssuerError(response.status_code, "bad_response", "answer is not JSON") from None


def _receipt(response: httpx.Response) -> Receipt | None:
    """The answer's ``AXID-Receipt``, strictly parsed; None if it has none."""
    values = response.headers.get_list(RECEIPT_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise ReceiptError(f"more than one {RECEIPT_HEADER} header")
    return Receipt.from_header(values[0])


def _check(response: httpx.Response, *expected: int) -> httpx.Response:
    if response.status_code in expected:
        return response
    reason, detail = "bad_response", f"unexpected HTTP status {response.status_code}"
    try:
        problem = json.loads(response.content)
    except ValueError:
        problem = None
    if isinstance(problem, dict) and isinstance(problem.get("reason"), str):
        reason = problem["reason"]
        if isinstance(problem.get("detail"), str):
            detail = problem["detail"][:_MAX_DETAIL]
    try:
        receipt = _receipt(response)
    except ReceiptError:
        receipt = None  # the refusal stands; only its evidence is unusable
    raise IssuerError(response.status_code, reason, detail, receipt=receipt)


def _minted(response: httpx.Response) -> MintResult:
    doc = _json(_check(response, 201))
    try:
        token, jti, kid, exp = doc["token"], doc["jti"], doc["kid"], doc["expires_at"]
    except (KeyError, TypeError):
        raise IssuerError(
            201, "bad_response", "mint answer lacks token/jti/kid/expires_at"
        ) from None
    if not (isinstance(token, str) and isinstance(jti, str) and isinstance(kid, str)):
        raise IssuerError(201, "bad_response", "mint answer has members of the wrong type")
    if isinstance(exp, bool) or not isinstance(exp, int):
        raise IssuerError(201, "bad_response", "expires_at is not an integer")
    try:
        receipt = _receipt(response)
    except ReceiptError as exc:
        raise IssuerError(201, "bad_response", f"malformed {RECEIPT_HEADER}: {exc}") from None
    return MintResult(token, jti, kid, exp, receipt)


def _segment(value: str) -> str:
    """An approval id as one path segment (base64url only: nothing to escape)."""
    if not value or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
        raise ValueError("an approval id is base64url")
    return value


def _object(response: httpx.Response, status: int, problem: str) -> dict[str, Any]:
    """A ``status`` answer's JSON object; ``bad_response`` with ``problem`` if it is not one."""
    doc = _json(_check(response, status))
    if not isinstance(doc, dict):
        raise IssuerError(status, "bad_response", problem)
    return doc


def _approval_list(response: httpx.Response) -> list[dict[str, Any]]:
    doc = _json(_check(response, 200))
    items = doc.get("approvals") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise IssuerError(200, "bad_response", "approvals answer is not a list")
    return items


def _approval_doc(response: httpx.Response) -> dict[str, Any]:
    doc = _json(_check(response, 200))
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        raise IssuerError(200, "bad_response", "approval answer has no status")
    return doc


def _decision_body(decision: str, note: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"decision": decision}
    if note is not None:
        body["note"] = note
    return body


def _unreachable(exc: httpx.HTTPError) -> IssuerError:
    return IssuerError(None, "issuer_unreachable", f"{type(exc).__name__}: {exc}"[:_MAX_DETAIL])


def _tls_context(
    url: str, source: X509Source, issuer_id: SpiffeId | SpiffeIdPattern | str | None
) -> ssl.SSLContext:
    """The client's mTLS context for ``url``, checked first: no TLS context is built
    for a URL we refuse."""
    check_issuer_url(url)
    return client_context(source, server_id=issuer_id_matcher(issuer_id, source))


def _revocations_params(since: int, limit: int | None) -> dict[str, int]:
    params = {"since": since}
    if limit is not None:
        params["limit"] = limit
    return params


class IssuerClient:
    """Blocking client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        source: X509Source,
        *,
        issuer_id: SpiffeId | SpiffeIdPattern | str | None = None,
        timeout: float = 10.0,
    ) -> None:
        ctx = _tls_context(url, source, issuer_id)
        # trust_env off: no proxy or netrc from the environment on an mTLS channel.
        self._http = httpx.Client(base_url=url, verify=ctx, timeout=timeout, trust_env=False)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None

    def mint(
        self,
        *,
        agent: str,
        run: str,
        audience: str | list[str],
        scope: str,
        parent_token: str | None = None,
        ttl_seconds: int | None = None,
        tenant: str | None = None,
    ) -> MintResult:
        body = _mint_body(agent, run, audience, scope, parent_token, ttl_seconds, tenant)
        return _minted(self._send("POST", "/v1/tokens", json=body))

    def jwks(self) -> dict[str, Any]:
        response = self._send("GET", "/.well-known/jwks.json")
        return _object(response, 200, "JWKS is not a JSON object")

    def key_set(self) -> KeySet:
        """The issuer's JWKS as a KeySet (strictly parsed)."""
        return KeySet.from_jwks(self.jwks())

    def revocations(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        params = _revocations_params(since, limit)
        response = self._send("GET", "/v1/revocations", params=params)
        return _object(response, 200, "revocations answer is not an object")

    def revoke(self, kind: str, value: str, reason: str) -> dict[str, Any]:
        body = {"kind": kind, "value": value, "reason": reason}
        response = self._send("POST", "/v1/revocations", json=body)
        return _object(response, 201, "revocation answer is not an object")

    def checkpoint(self) -> str:
        return _check(self._send("GET", "/v1/audit/checkpoint"), 200).text

    # Approvals (DESIGN.md "Approvals"): an approver's and a polling agent's calls.

    def approvals(self, status: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/approvals[?status=...]``: the requests this approver may decide."""
        params = {"status": status} if status is not None else None
        return _approval_list(self._send("GET", "/v1/approvals", params=params))

    def approval(self, approval_id: str) -> dict[str, Any]:
        """``GET /v1/approvals/{id}``: its status and, once approved, ``token``."""
        return _approval_doc(self._send("GET", f"/v1/approvals/{_segment(approval_id)}"))

    def decide(self, approval_id: str, decision: str, note: str | None = None) -> dict[str, Any]:
        """``POST /v1/approvals/{id}/decision`` with ``approve`` or ``deny``."""
        path = f"/v1/approvals/{_segment(approval_id)}/decision"
        return _approval_doc(self._send("POST", path, json=_decision_body(decision, note)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IssuerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncIssuerClient:
    """The asyncio twin of :class:`IssuerClient`."""

    def __init__(
        self,
        url: str,
        source: X509Source,
        *,
        issuer_id: SpiffeId | SpiffeIdPattern | str | None = None,
        timeout: float = 10.0,
    ) -> None:
        ctx = _tls_context(url, source, issuer_id)
        self._http = httpx.AsyncClient(base_url=url, verify=ctx, timeout=timeout, trust_env=False)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None

    async def mint(
        self,
        *,
        agent: str,
        run: str,
        audience: str | list[str],
        scope: str,
        parent_token: str | None = None,
        ttl_seconds: int | None = None,
        tenant: str | None = None,
    ) -> MintResult:
        body = _mint_body(agent, run, audience, scope, parent_token, ttl_seconds, tenant)
        return _minted(await self._send("POST", "/v1/tokens", json=body))

    async def approvals(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status is not None else None
        return _approval_list(await self._send("GET", "/v1/approvals", params=params))

    async def approval(self, approval_id: str) -> dict[str, Any]:
        return _approval_doc(await self._send("GET", f"/v1/approvals/{_segment(approval_id)}"))

    async def decide(
        self, approval_id: str, decision: str, note: str | None = None
    ) -> dict[str, Any]:
        path = f"/v1/approvals/{_segment(approval_id)}/decision"
        return _approval_doc(await self._send("POST", path, json=_decision_body(decision, note)))

    async def jwks(self) -> dict[str, Any]:
        response = await self._send("GET", "/.well-known/jwks.json")
        return _object(response, 200, "JWKS is not a JSON object")

    async def key_set(self) -> KeySet:
        return KeySet.from_jwks(await self.jwks())

    async def revocations(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        params = _revocations_params(since, limit)
        response = await self._send("GET", "/v1/revocations", params=params)
        return _object(response, 200, "revocations answer is not an object")

    async def revoke(self, kind: str, value: str, reason: str) -> dict[str, Any]:
        body = {"kind": kind, "value": value, "reason": reason}
        response = await self._send("POST", "/v1/revocations", json=body)
        return _object(response, 201, "revocation answer is not an object")

    async def checkpoint(self) -> str:
        return _check(await self._send("GET", "/v1/audit/checkpoint"), 200).text

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncIssuerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
