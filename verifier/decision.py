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
from axid.audit.entry import DecisionFields
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


def _drafted(name: str) -> property:
    def get(self: Decision) -> Any:
        return None if self.draft is None else getattr(self.draft, name)

    return property(get, doc=f"The draft's ``{name}`` (None without one).")


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the pipeline, with the draft of the one record the log takes.

    ``draft`` holds the decision-log fields the steps learned (an
    :class:`~axid.audit.DecisionDraft`, not changed after the decision);
    :attr:`record` finishes it into the log's :class:`DecisionFields` when the
    decision is recorded (step 8), not before: deciding costs no encoding.
    ``detail`` is for the problem+json answer; it never holds a token.
    """

    allow: bool
    reason: str
    detail: str = ""
    draft: DecisionDraft | None = field(default=None, repr=False, compare=False)
    action: VerifiedAction | None = field(default=None, compare=False)
    # An approval_required deny: the filed approval {id, url, expires_at} (problem+json).
    approval: Mapping[str, Any] | None = field(default=None, compare=False)
    _record: DecisionFields | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reason not in STATUS:
            raise ValueError(f"unknown reason code {self.reason!r}")
        if self.allow != (self.reason == "ok"):
            raise ValueError("a decision allows exactly when its reason is 'ok'")
        if self.allow and (self.action is None or self.draft is None):
            raise ValueError("an allow decision carries its verified action and its draft")

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
        """The decision ``reason``, recorded (when it is) from ``draft``."""
        return cls(reason == "ok", reason, detail, draft, action, approval)

    @property
    def record(self) -> DecisionFields | None:
        """The log's record of this decision (None without a draft); raises
        :class:`~axid.audit.EntryError` if the draft holds what the log format
        refuses, and then the decision cannot be recorded (an unrecorded 503)."""
        if self._record is None and self.draft is not None:
            record = self.draft.finish(self.decision, self.reason)
            object.__setattr__(self, "_record", record)  # frozen: set once, here
        return self._record

    @property
    def decision(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    @property
    def title(self) -> str:
        return HTTPStatus(self.status).phrase

    peer = _drafted("peer")
    tenant = _drafted("tenant")
    agent = _drafted("agent")
    run = _drafted("run")
    jti = _drafted("jti")
    rule = _drafted("rule")
    note = _drafted("note")
