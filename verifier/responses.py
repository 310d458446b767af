"""What the verifier writes back: the deny answer, and the receipt on an allow.

Every recorded decision's response, deny or allow, carries ``AXID-Receipt:
<Receipt.header_value()>`` (seq, leaf hash, entry bytes, signed checkpoint): on a
deny in the problem+json answer (:func:`refuse`), on an allow appended to the app's
``http.response.start`` headers (:func:`with_header`). A 503 ``audit_unavailable``
(nothing committed) has none, and neither has a WebSocket deny (a close frame
carries no headers).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

from axid.audit.receipt import RECEIPT_HEADER, Receipt
from mtls._problem import problem_document
from verifier.decision import Decision

__all__ = ["problem_body", "problem_json", "receipt_header", "refuse", "with_header"]

_Message = MutableMapping[str, Any]
_Send = Callable[[_Message], Awaitable[None]]

_RECEIPT_NAME: Final = RECEIPT_HEADER.lower().encode("ascii")


def problem_json(
    status: int, reason: str, detail: str, approval: Mapping[str, Any] | None = None
) -> bytes:
    """An RFC 9457 problem+json body, the shape of the verifier's denies (with the
    filed ``approval`` of an ``approval_required`` deny)."""
    extra = {} if approval is None else {"approval": dict(approval)}
    doc = problem_document(status, reason, detail, **extra)
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def problem_body(decision: Decision) -> bytes:
    """The problem+json body of a deny (the issuer's shape)."""
    return problem_json(decision.status, decision.reason, decision.detail, decision.approval)


def receipt_header(receipt: Receipt | None) -> tuple[bytes, bytes] | None:
    """The ``AXID-Receipt`` response header of a committed decision."""
    if receipt is None:
        return None
    return _RECEIPT_NAME, receipt.header_value().encode("ascii")


def with_header(send: _Send, header: tuple[bytes, bytes]) -> _Send:
    """``send``, adding ``header`` to the app's ``http.response.start``."""

    async def send_with_header(message: _Message) -> None:
        if message["type"] == "http.response.start":
            # A new list: the app may reuse the one it sent.
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_header


async def refuse(
    scope: MutableMapping[str, Any],
    send: _Send,
    decision: Decision,
    receipt: tuple[bytes, bytes] | None,
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
