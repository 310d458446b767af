"""What the pipeline's steps share (pipeline.py, and the approval step in approval.py).

:class:`Presented` is what one request presents, :class:`Deny` the private
exception a step raises to stop at a deny, :class:`Facts` the decision-log fields
the steps fill in, and :func:`replay_call` the one way a step reaches the
single-use store (a store failure denies ``audit_unavailable``: fail closed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from axid.audit.draft import DecisionDraft
from axid.keys import b64url_decode
from axid.tokens import ActionClaims
from verifier.checks import RequestInfo
from verifier.identity import PeerIdentity
from verifier.rules import RouteRule

__all__ = ["Deny", "Facts", "Presented", "replay_call", "short"]

_MAX_NOTE_PART: Final = 500

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Presented:
    """What one request presents, as the middleware read it from the ASGI scope.

    ``tls_chain`` is ``None`` for a plain-TCP connection; ``client_ip`` is the
    socket peer's address (never a forwarded one; ``None`` when unknown);
    ``token_headers`` counts the token header lines (more than one is refused as
    ambiguous), ``xfcc_headers`` the ``X-Forwarded-Client-Cert`` lines (more than
    one from a trusted proxy is refused as malformed). ``unroutable`` says why the
    request could not be matched to a route rule (a method or path not in normal
    form), else ``None``.
    """

    method: str
    path: str
    tls_chain: Sequence[str | bytes] | None
    client_ip: str | None
    token: str | None
    token_headers: int
    xfcc: str | None
    info: RequestInfo
    xfcc_headers: int = 1
    unroutable: str | None = None
    # Approval routes only: the X-AXID-Approval header (and how many lines), the raw
    # request target with its query, and the body's SHA-256 (None: over the cap).
    approval: str | None = None
    approval_headers: int = 0
    target: str | None = None
    body_sha256: str | None = None
    # The method and path as the log records them (the middleware clips long ones);
    # None: ``method`` and ``path``.
    logged_method: str | None = None
    logged_path: str | None = None


class Deny(Exception):
    """A step's deny: the reason code, the problem detail, and what the log notes."""

    def __init__(
        self,
        reason: str,
        detail: str,
        note: str | None = None,
        approval: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.note = note
        self.approval = approval


def short(text: str) -> str:
    """``text`` clipped to what one note part may hold."""
    return text if len(text) <= _MAX_NOTE_PART else text[: _MAX_NOTE_PART - 3] + "..."


async def replay_call(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` on the single-use store, off the event loop; the store
    failing denies ``audit_unavailable`` (never allow what may be used already)."""
    try:
        return await asyncio.to_thread(call, *args)
    except (SQLAlchemyError, OSError) as exc:
        raise Deny(
            "audit_unavailable",
            "the single-use store is unavailable",
            note=f"replay store: {type(exc).__name__}",
        ) from None


class Facts(DecisionDraft):
    """The decision-log fields of one request, filled in as the steps learn them."""

    __slots__ = ()

    def __init__(self, rule: RouteRule | None, method: str, path: str, service: str) -> None:
        super().__init__(
            method,
            path,
            service,
            rule=rule.label if rule is not None else None,
            scope_required=rule.scope_required if rule is not None else None,
        )

    def add_note(self, text: str | None) -> None:
        if text:
            self.notes.append(short(text))

    def set_peer(self, peer: PeerIdentity) -> None:
        self.peer, self.peer_cert = peer.spiffe_id, peer.x5t_s256
        self.add_note(peer.note)

    def set_claims(self, claims: ActionClaims) -> None:
        self.kid, self.jti, self.iss = claims.kid, claims.jti, claims.iss
        self.tenant, self.agent, self.run = claims.tenant, claims.agent, claims.run
        self.spawn_parent, self.chain = claims.spawn_parent, claims.chain

    def set_signed_payload(self, token: str) -> None:
        """Fields of a token whose signature verified but which failed a later check."""
        try:
            header, payload, _ = token.split(".")
            head: Any = json.loads(b64url_decode(header))
            doc: Any = json.loads(b64url_decode(payload))
        except ValueError:
            return
        if not isinstance(head, dict) or not isinstance(doc, dict):
            return

        def text(obj: dict[str, Any], name: str) -> str | None:
            value = obj.get(name)
            return short(value) if isinstance(value, str) else None

        self.kid = text(head, "kid")
        self.jti, self.iss = text(doc, "jti"), text(doc, "iss")
        self.tenant, self.agent, self.run = (
            text(doc, "tenant"),
            text(doc, "agent"),
            text(doc, "run"),
        )
        self.spawn_parent = text(doc, "spawn_parent")
        chain = doc.get("chain")
        if isinstance(chain, list) and len(chain) <= 8 and all(isinstance(c, str) for c in chain):
            self.chain = tuple(short(c) for c in chain)
