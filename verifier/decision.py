"""What the pipeline decides: reason codes, their HTTP status, the decision, the action.

The reason codes and their statuses are :mod:`axid.reasons`' (the one table);
:data:`STATUS` is its verifier part: DESIGN.md's codes, among them two that are
503 and fail-closed:

* ``revocation_unavailable``: the revocation list is older than its ``max_stale``
  (or was never loaded), so "not revoked" cannot be established;
* ``jwks_unavailable``: the issuer's key set is older than its ``max_stale`` (or
  was never loaded), so no token can be checked against current keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

from axid.audit.draft import DecisionDraft
from axid.audit.entry import DecisionFields, EntryError
from axid.reasons import IDENTITY_REASONS, VERIFIER_REASONS
from axid.reasons import VERIFIER_STATUS as STATUS
from axid.tokens import ActionClaims

__all__ = [
    "IDENTITY_REASONS",
    "REASONS",
    "STATUS",
    "UNRECORDABLE",
    "Decision",
    "VerifiedAction",
    "status_of",
]

REASONS: Final = VERIFIER_REASONS
# The detail of a decision that could not be committed (or cannot be recorded at all).
UNRECORDABLE: Final = "the decision could not be recorded; nothing is allowed unrecorded"


def status_of(reason: str) -> int:
    """The HTTP status of a reason code (KeyError for an unknown one)."""
    return STATUS[reason]


@dataclass(frozen=True, slots=True)
class VerifiedAction:
    """An allowed request's verified action: ``request.state.axid``.

    ``spiffe_id`` is the peer's (equal to the token's ``sub``); the rest is from
    the verified token. ``log_seq`` is the position of the allow entry in the
    decision log (set once it is committed).
    """

    spiffe_id: str
    tenant: str
    agent: str
    run: str
    spawn_parent: str | None
    chain: tuple[str, ...]
    scope: frozenset[str]
    jti: str
    claims: ActionClaims = field(repr=False, compare=False)
    log_seq: int | None = None

    @property
    def root_run(self) -> str:
        """The root of the run tree this action belongs to."""
        return self.chain[0] if self.chain else self.run

    @property
    def exp(self) -> int:
        return self.claims.exp

    @classmethod
    def from_claims(cls, claims: ActionClaims) -> VerifiedAction:
        return cls(
            spiffe_id=claims.sub,
            tenant=claims.tenant,
            agent=claims.agent,
            run=claims.run,
            spawn_parent=claims.spawn_parent,
            chain=claims.chain,
            scope=claims.scope,
            jti=claims.jti,
            claims=claims,
        )


def _recorded(name: str) -> property:
    def get(self: Decision) -> Any:
        return None if self.record is None else getattr(self.record, name)

    return property(get, doc=f"The record's ``{name}`` (None without a record).")


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the pipeline and the one record the log takes of it.

    ``record`` is the decision-log entry's fields (:class:`DecisionFields`, built
    from the pipeline's :class:`~axid.audit.DecisionDraft`); ``None`` when the
    decision cannot be recorded (then it is an unrecorded 503). An unrecorded
    deny made from a decision whose commit failed keeps that decision's record,
    for the service's own log line. ``detail`` is for the problem+json answer;
    it never holds a token.
    """

    allow: bool
    reason: str
    detail: str = ""
    record: DecisionFields | None = field(default=None, repr=False)
    action: VerifiedAction | None = field(default=None, compare=False)
    # An approval_required deny: the filed approval {id, url, expires_at} (problem+json).
    approval: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.reason not in STATUS:
            raise ValueError(f"unknown reason code {self.reason!r}")
        if self.allow != (self.reason == "ok"):
            raise ValueError("a decision allows exactly when its reason is 'ok'")
        if self.allow and (self.action is None or self.record is None):
            raise ValueError("an allow decision carries its verified action and its record")

    @classmethod
    def of(
        cls,
        draft: DecisionDraft,
        reason: str,
        detail: str = "",
        *,
        action: VerifiedAction | None = None,
        approval: Mapping[str, Any] | None = None,
    ) -> Decision:
        """The decision ``reason`` with ``draft`` finished as its record; a draft the
        log format refuses (EntryError) makes it an unrecorded 503 deny."""
        allow = reason == "ok"
        try:
            record = draft.finish("allow" if allow else "deny", reason)
        except EntryError:
            return cls(False, "audit_unavailable", UNRECORDABLE)
        return cls(allow, reason, detail, record, action, approval)

    @property
    def decision(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    @property
    def title(self) -> str:
        return HTTPStatus(self.status).phrase

    peer = _recorded("peer")
    tenant = _recorded("tenant")
    agent = _recorded("agent")
    run = _recorded("run")
    jti = _recorded("jti")
    rule = _recorded("rule")
    note = _recorded("note")
