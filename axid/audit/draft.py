"""What a service learns of one request's decision, before it is one record.

A refusal can come at any step of a request, and must record what was known
by then; so the verifier's pipeline and the issuer fill a :class:`DecisionDraft`
as they go, and :meth:`DecisionDraft.finish` turns it into the log's one record
type, :class:`~axid.audit.entry.DecisionFields` (validated, immutable). The
field names are DecisionFields' own; this is the only other place that lists them.
"""

from __future__ import annotations

from axid.audit.entry import DecisionFields

__all__ = ["DecisionDraft"]


class DecisionDraft:
    """The decision-log fields of one request, filled in as they become known.

    Mutable and for one request only (one task); ``notes`` are joined with
    ``"; "`` and cut by :meth:`DecisionFields.cut_note` when finished.
    """

    __slots__ = (
        "agent",
        "chain",
        "iss",
        "jti",
        "kid",
        "method",
        "notes",
        "path",
        "peer",
        "peer_cert",
        "rule",
        "run",
        "scope_required",
        "service",
        "spawn_parent",
        "tenant",
    )

    def __init__(
        self,
        method: str | None,
        path: str | None,
        service: str | None = None,
        *,
        rule: str | None = None,
        scope_required: str | None = None,
    ) -> None:
        self.method, self.path, self.service = method, path, service
        self.rule, self.scope_required = rule, scope_required
        self.peer: str | None = None
        self.peer_cert: str | None = None
        self.kid: str | None = None
        self.jti: str | None = None
        self.iss: str | None = None
        self.tenant: str | None = None
        self.agent: str | None = None
        self.run: str | None = None
        self.spawn_parent: str | None = None
        self.chain: tuple[str, ...] = ()
        self.notes: list[str] = []

    @property
    def note(self) -> str | None:
        """The notes so far, joined (``None`` when there are none)."""
        return "; ".join(self.notes) or None

    @note.setter
    def note(self, text: str | None) -> None:
        """Replace the notes so far with ``text``."""
        self.notes = [text] if text else []

    def add_note(self, text: str | None) -> None:
        """Add ``text`` to the entry's note (nothing for an empty one)."""
        if text:
            self.notes.append(text)

    def finish(self, decision: str, reason: str) -> DecisionFields:
        """The decision as the log records it (:class:`EntryError` if a field is malformed)."""
        return DecisionFields(
            decision,
            reason,
            self.method,
            self.path,
            self.service,
            self.peer,
            self.peer_cert,
            self.kid,
            self.jti,
            self.iss,
            self.tenant,
            self.agent,
            self.run,
            self.spawn_parent,
            self.chain,
            self.scope_required,
            self.rule,
            DecisionFields.cut_note(self.note),
        )
