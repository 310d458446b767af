"""The story, as a table: :data:`STEPS`, played in order by :mod:`axid.demo.play`.

A step says who acts, the request (:class:`Mint`, :class:`Call`, :class:`Revoke`,
:class:`Anonymous`), the answer it must get (status and reason code), what its row
shows under the action, what else it must be true of the answer (a check) and what
to keep for later steps (a minted token, by name).

Text in the table is a template: ``{planner}`` and ``{worker}`` stand for the two
runs' ids (``planner-<hex>``, ``worker-<hex>``), ``{leeway}`` for the verifier's
leeway, and a detail may name what came back: ``{who}`` (who the handler says did
it and the chain), ``{note}`` (why it was denied), ``{chain}`` (the log entry's
chain) and what the request adds (:attr:`Answer.facts`).

Every step but the last is a real HTTP request that the decision log records and
whose answer carries that entry's ``AXID-Receipt``; the last is refused by the TLS
handshake (no HTTP answer: its expected status is ``None``, its reason a prefix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from axid.audit.receipt import Receipt
from axid.demo.payments import PAYMENTS_SERVICE
from axid.demo.provisioning import ISSUER_LOG, PLANNER_SCOPE, WORKER2_NAME
from axid.demo.stack import DEMO_LEEWAY
from axid.issuer.client import MintResult
from axid.issuer.service import SERVICE_NAME as ISSUER_SERVICE_NAME

__all__ = [
    "NO_LOG",
    "RECEIPT_STEP",
    "STEPS",
    "STORY_STEPS",
    "Anonymous",
    "Answer",
    "Call",
    "Decide",
    "Mint",
    "Revoke",
    "Runs",
    "Step",
]

NO_LOG: Final = "—"  # shown where nothing was recorded (and for no HTTP status)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Mint:
    """``POST /v1/tokens`` at the issuer with ``agent``'s SVID, for audience payments;
    ``run`` names whose run it is (``planner`` or ``worker``); ``parent`` a kept token
    to spawn from; ``ttl`` the token's lifetime in seconds."""

    agent: str
    run: str
    scope: str
    parent: str | None = None
    ttl: int | None = None


@dataclass(frozen=True)
class Call:
    """A request to payments with ``client``'s SVID and the kept ``token``; with
    ``after_expiry``, sent once the token is past its ``exp`` and the verifier's leeway
    (the demo waits for real)."""

    client: str
    method: str
    path: str
    token: str
    after_expiry: bool = False
    # Approvals: the kept approval whose token goes in X-AXID-Approval, or the name
    # under which to keep the approval an approval_required deny names.
    approval: str | None = None
    keep_approval: str | None = None


@dataclass(frozen=True)
class Decide:
    """``approver`` decides the kept approval ``approval`` (issuer ``POST
    /v1/approvals/{id}/decision``, as ``axid approvals approve`` does); then
    ``agent`` polls ``GET /v1/approvals/{id}`` for the approval token (kept)."""

    approver: str
    approval: str
    agent: str
    decision: str = "approve"


@dataclass(frozen=True)
class Revoke:
    """The admin revokes ``run`` at the issuer (``POST /v1/revocations``); then the
    demo waits (bounded) until the verifier's revocation source has it."""

    run: str
    reason: str = "demo: the planner's run"


@dataclass(frozen=True)
class Anonymous:
    """``GET path`` with the kept ``token`` from a TLS client that trusts the bundle
    but has no certificate to show."""

    path: str
    token: str


Request = Mint | Call | Decide | Revoke | Anonymous


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Runs:
    """The story's two run ids."""

    planner: str
    worker: str

    @classmethod
    def new(cls, suffix: str) -> Runs:
        return cls(f"planner-{suffix}", f"worker-{suffix}")

    def __getitem__(self, role: str) -> str:
        return {"planner": self.planner, "worker": self.worker}[role]


def chain_text(chain: list[str] | tuple[str, ...], run: str | None) -> str:
    return " → ".join([*chain, run or "?"])


@dataclass
class Answer:
    """What came back: the HTTP status (None: no HTTP answer) and reason code, the
    body, the decision-log entry that recorded the request, the answer's receipt
    (or why it could not be read), the minted token and what the request adds for
    the row (``facts``)."""

    status: int | None
    reason: str
    body: Any = None
    entry: dict[str, Any] | None = None
    receipt: Receipt | None = None
    bad_receipt: str | None = None  # why the answer's AXID-Receipt could not be read
    minted: MintResult | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> str:
        """``payments #N``, ``issuer #N``, or :data:`NO_LOG`."""
        if self.entry is None:
            return NO_LOG
        service = self.entry.get("service")
        log = ISSUER_LOG if service == ISSUER_SERVICE_NAME else PAYMENTS_SERVICE
        return f"{log} #{self.entry['seq']}"

    @property
    def by(self) -> dict[str, Any] | None:
        """Who the handler says did it (an allowed request's ``by``)."""
        by = self.body.get("by") if isinstance(self.body, dict) else None
        return by if isinstance(by, dict) else None

    @property
    def who(self) -> str:
        by = self.by
        if by is None:
            return ""
        chain = chain_text(by["chain"], by["run"])
        return f"by {by.get('tenant')}/{by.get('agent')}, chain {chain}"

    @property
    def note(self) -> str:
        """Why it was denied: the log entry's note, else the problem's detail."""
        note = self.entry.get("note") if self.entry else None
        if not note and isinstance(self.body, dict):
            note = self.body.get("detail")
        return str(note) if note else ""

    @property
    def chain(self) -> str:
        """The chain the log entry records (a mint's: its parents, then its run)."""
        entry = self.entry or {}
        return chain_text(entry.get("chain") or [], entry.get("run"))

    def text(self, template: str, runs: Runs) -> str:
        """``template`` with the runs, the leeway and what came back filled in."""
        return template.format_map(_Names(self, runs))


class _Names:
    """The names a template may use (for ``str.format_map``; looked up when used)."""

    def __init__(self, answer: Answer, runs: Runs) -> None:
        self._answer, self._runs = answer, runs

    def __getitem__(self, name: str) -> Any:
        if name in ("planner", "worker"):
            return self._runs[name]
        if name == "leeway":
            return DEMO_LEEWAY
        if name in ("who", "note", "chain"):
            return getattr(self._answer, name)
        return self._answer.facts[name]


# --------------------------------------------------------------------------- checks

Check = Callable[[Answer, Runs], str | None]


def handler_saw_its_entry(answer: Answer, _runs: Runs) -> str | None:
    """An allowed request's handler saw its own log entry's seq."""
    by = answer.by
    if answer.entry is None or by is None:
        return "the answer does not say who did it"
    if by.get("log_seq") != answer.entry["seq"]:
        return "the handler's log_seq is not the log entry's seq"
    return None


def chain_is(parent: str, run: str) -> Check:
    """The minted token's log entry records ``parent``'s run, then ``run``'s."""

    def check(answer: Answer, runs: Runs) -> str | None:
        want = chain_text([runs[parent]], runs[run])
        return None if answer.chain == want else f"the chain is not {want}"

    return check


def cascades_to(run: str) -> Check:
    """The revocation's answer lists ``run``'s among the runs it cascaded to."""

    def check(answer: Answer, runs: Runs) -> str | None:
        cascaded = [str(c.get("value")) for c in (answer.body or {}).get("cascaded", [])]
        return None if runs[run] in cascaded else f"the revocation did not cascade to {runs[run]}"

    return check


def approved_by(name: str) -> Check:
    """An allowed request whose log entry names its approval and ``name``, the approver."""

    def check(answer: Answer, runs: Runs) -> str | None:
        note = str((answer.entry or {}).get("note") or "")
        if "approval " not in note or f"/{name}" not in note.split(" by ")[-1]:
            return f"the log entry does not name the approval and its approver {name}"
        return handler_saw_its_entry(answer, runs)

    return check


def nothing_recorded(answer: Answer, _runs: Runs) -> str | None:
    return "the payments log grew: something was recorded" if answer.facts["log_grew"] else None


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Step:
    """One row of the story: who acts, the request, the answer it must get (status
    and reason; ``None`` and a prefix: no HTTP answer, the TLS layer refuses), the
    row's detail (a template), a check, and the name under which to keep the minted
    token. ``recorded``: the request must be in a decision log, with a receipt."""

    actor: str
    action: str
    request: Request
    expect: tuple[int | None, str]
    detail: str = "{note}"
    check: Check | None = None
    keep: str | None = None
    recorded: bool = True


CREATED: Final = (201, "ok")
ALLOWED: Final = (200, "ok")

STEPS: Final[tuple[Step, ...]] = (
    Step(
        "planner",
        "mint a token (issuer POST /v1/tokens)",
        Mint("planner", "planner", PLANNER_SCOPE),
        CREATED,
        "run {planner}, scope read refund delete",
        keep="root",
    ),
    Step(
        "planner",
        "mint a 1-second token (ttl_seconds=1)",
        Mint("planner", "planner", "payments:read", ttl=1),
        CREATED,
        "kept for the expiry step below",
        keep="short",
    ),
    Step(
        "planner",
        "GET /payments/p-1001",
        Call("planner", "GET", "/payments/p-1001", "root"),
        ALLOWED,
        "{who}",
        handler_saw_its_entry,
    ),
    Step(
        "planner",
        "POST /payments/p-1001/refund",
        Call("planner", "POST", "/payments/p-1001/refund", "root"),
        ALLOWED,
        "refunded; the refund rule is single use",
        handler_saw_its_entry,
    ),
    Step(
        "planner",
        "POST /payments/p-1001/refund again, same token",
        Call("planner", "POST", "/payments/p-1001/refund", "root"),
        (403, "replayed"),
    ),
    Step(
        "worker",
        "spawned by the planner: mint a child token, scope payments:read",
        Mint("worker", "worker", "payments:read", parent="root"),
        CREATED,
        "chain {chain}",
        chain_is("planner", "worker"),
        keep="child",
    ),
    Step(
        "worker",
        "GET /payments/p-1002",
        Call("worker", "GET", "/payments/p-1002", "child"),
        ALLOWED,
        "{who}",
        handler_saw_its_entry,
    ),
    Step(
        "worker",
        "POST /payments/p-1002/refund (outside its token's scope)",
        Call("worker", "POST", "/payments/p-1002/refund", "child"),
        (403, "scope_insufficient"),
    ),
    Step(
        "worker #2",
        "GET /payments/p-1002 with the worker's token (another instance of the worker: "
        "its own valid SVID for the same SPIFFE ID)",
        Call(WORKER2_NAME, "GET", "/payments/p-1002", "child"),
        (401, "cert_binding_mismatch"),
    ),
    Step(
        "planner",
        "GET /payments/p-1002 with the worker's token",
        Call("planner", "GET", "/payments/p-1002", "child"),
        (401, "subject_mismatch"),
    ),
    Step(
        "planner",
        "DELETE /payments/p-1003 (the rule says approval: required)",
        Call("planner", "DELETE", "/payments/p-1003", "root", keep_approval="delete"),
        (403, "approval_required"),
        "filed approval {approval} at the issuer; the admin must decide",
    ),
    Step(
        "admin",
        "approve it (axid approvals approve ID)",
        Decide("admin", "delete", "planner"),
        ALLOWED,
        "approved; the planner polled GET /v1/approvals/ID: approval token {token_type}",
    ),
    Step(
        "planner",
        "DELETE /payments/p-1003 again, with the approval token (X-AXID-Approval)",
        Call("planner", "DELETE", "/payments/p-1003", "root", approval="delete"),
        ALLOWED,
        "{note}",
        approved_by("admin"),
    ),
    Step(
        "planner",
        "DELETE /payments/p-1003 once more, same approval token",
        Call("planner", "DELETE", "/payments/p-1003", "root", approval="delete"),
        (403, "approval_invalid"),
    ),
    Step(
        "planner",
        "GET /payments/p-1003 with the 1-second token",
        Call("planner", "GET", "/payments/p-1003", "short", after_expiry=True),
        (401, "token_expired"),
        "waited {waited:.1f} s for exp + {leeway} s leeway",
    ),
    Step(
        "admin",
        "revoke run {planner} (issuer POST /v1/revocations)",
        Revoke("planner"),
        CREATED,
        "cascaded to {cascaded}; the verifier had it {seen_ms:.1f} ms later",
        cascades_to("worker"),
    ),
    Step(
        "worker",
        "GET /payments/p-1002 (its parent run is revoked)",
        Call("worker", "GET", "/payments/p-1002", "child"),
        (403, "revoked"),
    ),
    Step(
        "anonymous",
        "GET /payments/p-1001 without a client certificate",
        Anonymous("/payments/p-1001", "root"),
        (None, "tls:"),
        "the server requires a client certificate and aborted the TLS handshake (asyncio "
        "sends no TLS alert, cpython#98078): nothing reached the service or its log",
        nothing_recorded,
        recorded=False,
    ),
)

# Rows of a complete story (a shorter list means a step was skipped).
STORY_STEPS: Final = len(STEPS)
# The step whose receipt the demo keeps and has checked at the end: the allowed refund.
RECEIPT_STEP: Final = 4
