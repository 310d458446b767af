"""Playing the story: each step of :data:`axid.demo.steps.STEPS`, in order, as a real
request with real mTLS clients against a running :class:`axid.demo.stack.DemoStack`.

A step's row shows the answer, the decision-log entry that recorded it (read from
the log's table: the story is sequential, so the log's last entry is this
request's, if it was recorded at all) and the seq of the ``AXID-Receipt`` the
answer carried, which must be that entry's. The story stops at the first step that
does not do what it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from axid.audit.receipt import RECEIPT_HEADER, Receipt, ReceiptError
from axid.audit.store import LogStore, make_engine
from axid.demo.payments import PAYMENTS_AUDIENCE, PAYMENTS_SERVICE
from axid.demo.provisioning import ISSUER_LOG, Provisioned
from axid.demo.stack import DEMO_LEEWAY, DemoStack
from axid.demo.steps import (
    NO_LOG,
    STEPS,
    Anonymous,
    Answer,
    Call,
    Decide,
    Mint,
    Request,
    Revoke,
    Runs,
    Step,
)
from axid.issuer.client import AsyncIssuerClient, IssuerError, MintResult
from mtls.sources import FileSource
from mtls.tlsconfig import client_context
from verifier.config import APPROVAL_HEADER, DEFAULT_HEADER

__all__ = ["StepResult", "play_story"]

_HTTP_TIMEOUT: Final = 5.0
_REVOCATION_WAIT: Final = 5.0


@dataclass(frozen=True)
class StepResult:
    """One row of the story: what was done, what came back, what should have."""

    number: int
    actor: str
    action: str
    expected_status: int | None  # None: no HTTP answer (the TLS handshake is refused)
    expected_reason: str  # with no HTTP answer: a prefix ("tls:"), the wording varies
    status: int | None
    reason: str
    log: str  # "payments #N", "issuer #N" or "—" (nothing was recorded)
    detail: str
    problem: str | None = None  # why the step did not do what it should
    receipt: Receipt | None = field(default=None, repr=False)  # the answer's AXID-Receipt

    @property
    def ok(self) -> bool:
        return self.problem is None


class _StoryFailed(Exception):
    """Something failed between two rows (the revocation never reached the verifier)."""


def _receipt_of(response: httpx.Response) -> tuple[Receipt | None, str | None]:
    """The answer's ``AXID-Receipt`` (strictly parsed), or why it is unusable."""
    values = response.headers.get_list(RECEIPT_HEADER)
    if not values:
        return None, None
    if len(values) > 1:
        return None, f"more than one {RECEIPT_HEADER} header"
    try:
        return Receipt.from_header(values[0]), None
    except ReceiptError as exc:
        return None, f"malformed {RECEIPT_HEADER}: {exc}"


def _receipt_is_for(receipt: Receipt, entry: dict[str, Any] | None) -> bool:
    """The receipt's entry bytes say exactly what the log's stored entry says."""
    try:
        return entry is not None and json.loads(receipt.entry) == entry
    except ValueError:
        return False


def _json(response: httpx.Response) -> Any:
    with contextlib.suppress(ValueError):
        return response.json()
    return None


def _tls_reason(exc: BaseException) -> str:
    """A short, honest name for how the TLS connection failed (walks the cause chain:
    httpx and anyio wrap the socket's error)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(e).__name__} {e}" for e in seen).lower()
    if "certificate required" in text or "certificate_required" in text:
        return "tls: certificate required"
    if "handshake failure" in text or "handshake_failure" in text:
        return "tls: handshake failure"
    if any(isinstance(e, ConnectionResetError) for e in seen):
        return "tls: connection reset"
    if "eof" in text or "disconnected" in text:
        return "tls: connection closed"
    return f"tls: {type(seen[-1]).__name__}"


def _problem(step: Step, answer: Answer, runs: Runs) -> str | None:
    """Why ``answer`` is not what ``step`` must get, or None."""
    want_status, want_reason = step.expect
    recorded = step.recorded
    if want_status is None:
        # No HTTP answer expected: the TLS layer refuses; how it says so varies.
        if answer.status is not None or not answer.reason.startswith(want_reason):
            return f"expected the TLS handshake to fail, got {answer.status} {answer.reason}"
    elif (answer.status, answer.reason) != (want_status, want_reason):
        return f"expected {want_status} {want_reason}, got {answer.status} {answer.reason}"
    elif recorded and answer.entry is None:
        return "no decision-log entry records this request"
    elif recorded and answer.entry is not None and answer.entry.get("reason") != want_reason:
        return f"the decision log says {answer.entry.get('reason')}, not {want_reason}"
    elif recorded and answer.receipt is None:
        return answer.bad_receipt or f"the answer carries no {RECEIPT_HEADER}"
    elif recorded and not _receipt_is_for(answer.receipt, answer.entry):
        return f"the answer's {RECEIPT_HEADER} is not for the log entry that recorded it"
    return None if step.check is None else step.check(answer, runs)


class _Clients:
    """Each identity's SVID source, issuer client and mTLS clients (kept alive from
    step to step, as an agent keeps them), and the demo database, to read the logs."""

    def __init__(self, stack: DemoStack) -> None:
        self.stack = stack
        self.p: Provisioned = stack.provisioned
        self._sources: dict[str, FileSource] = {}
        self._issuers: dict[str, AsyncIssuerClient] = {}
        self._https: dict[tuple[str, str], httpx.AsyncClient] = {}
        self._engine = make_engine(self.p.layout.db_url)

    def source(self, name: str) -> FileSource:
        if name not in self._sources:
            self._sources[name] = FileSource(self.p.cert(name), self.p.key(name), self.p.pki.bundle)
        return self._sources[name]

    def issuer(self, name: str) -> AsyncIssuerClient:
        """``name``'s issuer client (``axid.issuer.client``, as an agent mints)."""
        if name not in self._issuers:
            self._issuers[name] = AsyncIssuerClient(
                self.stack.issuer_url,
                self.source(name),
                issuer_id=self.p.spiffe_id("issuer"),
                timeout=_HTTP_TIMEOUT,
            )
        return self._issuers[name]

    def http(self, name: str, server: str = PAYMENTS_SERVICE) -> httpx.AsyncClient:
        """``name``'s mTLS client to payments (or, with ``server="issuer"``, the issuer)."""
        if (name, server) not in self._https:
            ctx = client_context(self.source(name), server_id=self.p.spiffe_id(server))
            self._https[(name, server)] = httpx.AsyncClient(
                base_url=self.stack.issuer_url if server == "issuer" else self.stack.payments_url,
                verify=ctx,
                timeout=_HTTP_TIMEOUT,
                trust_env=False,
            )
        return self._https[(name, server)]

    async def aclose(self) -> None:
        for client in self._https.values():
            await client.aclose()
        for issuer in self._issuers.values():
            await issuer.aclose()
        for source in self._sources.values():
            source.close()
        self._https.clear()
        self._issuers.clear()
        self._sources.clear()
        await asyncio.to_thread(self._engine.dispose)

    def _read_last(self, log: str) -> dict[str, Any] | None:
        store = LogStore(self._engine, log)
        size = store.size()
        if size == 0:
            return None
        for _seq, data, _leaf in store.entries(size - 1, size):
            entry: dict[str, Any] = json.loads(data)
            return entry
        return None

    async def last_entry(
        self, log: str, path: str, method: str | None = None
    ) -> dict[str, Any] | None:
        """The log's last entry if it is for ``path`` (and ``method``), else None."""
        entry = await asyncio.to_thread(self._read_last, log)
        if entry is None or entry.get("path") != path:
            return None
        return entry if method is None or entry.get("method") == method else None

    async def log_size(self, log: str) -> int:
        return await asyncio.to_thread(lambda: LogStore(self._engine, log).size())


class _Story:
    """Plays :data:`STEPS` in order; ``results`` holds one row per step played."""

    def __init__(self, stack: DemoStack, runs: Runs) -> None:
        self.stack = stack
        self.runs = runs
        self.clients = _Clients(stack)
        self.results: list[StepResult] = []
        self.kept: dict[str, MintResult] = {}  # minted tokens, by the table's names
        self.approvals: dict[str, dict[str, Any]] = {}  # {id, token?}, by the table's names

    async def play(self) -> None:
        """Every step in turn; stops after the first that does not do what it should."""
        for step in STEPS:
            answer = await self._perform(step.request)
            if not self._record(step, answer).ok:
                return
            if step.keep is not None:
                assert answer.minted is not None  # a 201 to a mint carries its token
                self.kept[step.keep] = answer.minted

    def _record(self, step: Step, answer: Answer) -> StepResult:
        problem = _problem(step, answer, self.runs)
        detail = answer.text(step.detail, self.runs)
        result = StepResult(
            number=len(self.results) + 1,
            actor=step.actor,
            action=answer.text(step.action, self.runs),
            expected_status=step.expect[0],
            expected_reason=step.expect[1],
            status=answer.status,
            reason=answer.reason,
            log=answer.log,
            detail=detail if problem is None else f"{detail}; {problem}".lstrip("; "),
            problem=problem,
            receipt=answer.receipt,
        )
        self.results.append(result)
        return result

    async def _perform(self, request: Request) -> Answer:
        if isinstance(request, Mint):
            return await self._mint(request)
        if isinstance(request, Call):
            return await self._call(request)
        if isinstance(request, Decide):
            return await self._decide(request)
        if isinstance(request, Revoke):
            return await self._revoke(request)
        return await self._anonymous(request)

    async def _mint(self, mint: Mint) -> Answer:
        parent = self.kept[mint.parent].token if mint.parent is not None else None
        try:
            minted = await self.clients.issuer(mint.agent).mint(
                agent=mint.agent,
                run=self.runs[mint.run],
                audience=PAYMENTS_AUDIENCE,
                scope=mint.scope,
                parent_token=parent,
                ttl_seconds=mint.ttl,
            )
            answer = Answer(201, "ok", receipt=minted.receipt, minted=minted)
        except IssuerError as exc:
            answer = Answer(exc.status, exc.reason, exc.detail, receipt=exc.receipt)
        if answer.status is not None:
            answer.entry = await self.clients.last_entry(ISSUER_LOG, "/v1/tokens")
        return answer

    async def _call(self, call: Call) -> Answer:
        token = self.kept[call.token]
        facts: dict[str, Any] = {}
        if call.after_expiry:  # wait (for real) until it is past exp + the verifier's leeway
            facts["waited"] = max(0.0, token.expires_at + DEMO_LEEWAY - time.time()) + 0.05
            await asyncio.sleep(facts["waited"])
        headers = {DEFAULT_HEADER: token.token}
        if call.approval is not None:
            headers[APPROVAL_HEADER] = self.approvals[call.approval].get("token", "")
        response = await self.clients.http(call.client).request(
            call.method, call.path, headers=headers
        )
        body = _json(response)
        if 200 <= response.status_code < 300:
            reason = "ok"
        elif isinstance(body, dict) and isinstance(body.get("reason"), str):
            reason = body["reason"]
        else:
            reason = f"HTTP {response.status_code}"
        receipt, bad_receipt = _receipt_of(response)
        entry = await self.clients.last_entry(PAYMENTS_SERVICE, call.path, call.method)
        filed = body.get("approval") if isinstance(body, dict) else None
        if call.keep_approval is not None and isinstance(filed, dict):
            self.approvals[call.keep_approval] = {"id": str(filed.get("id"))}
        facts["approval"] = filed.get("id") if isinstance(filed, dict) else "none"
        return Answer(response.status_code, reason, body, entry, receipt, bad_receipt, facts=facts)

    async def _decide(self, decide: Decide) -> Answer:
        """The approver's decision (what ``axid approvals approve`` sends), then the
        agent's poll for the approval token (what ``axid approvals wait`` does)."""
        kept = self.approvals.get(decide.approval, {})
        path = f"/v1/approvals/{kept.get('id')}"
        response = await self.clients.http(decide.approver, "issuer").post(
            f"{path}/decision", json={"decision": decide.decision, "note": "demo"}
        )
        doc = _json(response)
        doc = doc if isinstance(doc, dict) else {}
        facts: dict[str, Any] = {"token_type": "none"}
        if response.status_code != 200:
            reason = str(doc.get("reason") or "bad_response")
            return Answer(response.status_code, reason, doc, facts=facts)
        receipt, bad_receipt = _receipt_of(response)
        entry = await self.clients.last_entry(ISSUER_LOG, f"{path}/decision")
        polled = _json(await self.clients.http(decide.agent, "issuer").get(path))
        if isinstance(polled, dict) and isinstance(polled.get("token"), str):
            kept["token"] = polled["token"]
            facts["token_type"] = str(polled.get("token_type"))
        return Answer(200, "ok", doc, entry, receipt, bad_receipt, facts=facts)

    async def _revoke(self, revoke: Revoke) -> Answer:
        """Sent as the admin's plain mTLS request (what ``AsyncIssuerClient.revoke``
        sends: the client returns the document only, and the row shows the answer's
        receipt); then wait (bounded) until the verifier has it."""
        run = self.runs[revoke.run]
        response = await self.clients.http("admin", "issuer").post(
            "/v1/revocations", json={"kind": "run", "value": run, "reason": revoke.reason}
        )
        doc = _json(response)
        doc = doc if isinstance(doc, dict) else {}
        if response.status_code != 201:
            reason = str(doc.get("reason") or "bad_response")
            return Answer(response.status_code, reason, facts={"cascaded": "nothing", "seen_ms": 0})
        receipt, bad_receipt = _receipt_of(response)
        entry = await self.clients.last_entry(ISSUER_LOG, "/v1/revocations")
        cascaded = doc.get("cascaded", [])
        seen = await self._wait_for_revocation(max([doc["seq"], *(c["seq"] for c in cascaded)]))
        facts = {
            "cascaded": ", ".join(str(c.get("value")) for c in cascaded) or "nothing",
            "seen_ms": seen * 1000,
        }
        return Answer(201, "ok", doc, entry, receipt, bad_receipt, facts=facts)

    async def _wait_for_revocation(self, target: int) -> float:
        """Until the verifier's revocation source has revocation ``target``: asks it to
        look now rather than wait for its next poll. The seconds it took."""
        source = self.stack.revocations
        began = time.monotonic()
        while source.seq < target:
            if time.monotonic() - began > _REVOCATION_WAIT:
                raise _StoryFailed(
                    f"the verifier did not see revocation {target} within {_REVOCATION_WAIT:g} s"
                )
            await source.poll()
            if source.seq < target:
                await asyncio.sleep(0.05)
        return time.monotonic() - began

    async def _anonymous(self, request: Anonymous) -> Answer:
        """A plain TLS client that trusts the bundle but has no certificate to show."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # SVIDs name SPIFFE IDs, not hosts
        ctx.load_verify_locations(cafile=str(self.clients.p.pki.bundle))
        before = await self.clients.log_size(PAYMENTS_SERVICE)
        url = f"{self.stack.payments_url}{request.path}"
        headers = {DEFAULT_HEADER: self.kept[request.token].token}
        async with httpx.AsyncClient(verify=ctx, timeout=_HTTP_TIMEOUT, trust_env=False) as c:
            try:
                response = await c.get(url, headers=headers)
            except httpx.TransportError as exc:
                answer = Answer(None, _tls_reason(exc))
            else:
                body = _json(response)
                reason = body.get("reason") if isinstance(body, dict) else None
                answer = Answer(response.status_code, str(reason or "answered"))
        answer.facts["log_grew"] = await self.clients.log_size(PAYMENTS_SERVICE) != before
        return answer


def _failure(number: int, problem: str) -> StepResult:
    return StepResult(
        number, "demo", "(between steps)", None, "", None, "", NO_LOG, problem, problem
    )


async def play_story(stack: DemoStack) -> list[StepResult]:
    """Play the story against a running :class:`DemoStack`; one result per step played
    (it stops after the first step that did not do what it should)."""
    story = _Story(stack, Runs.new(secrets.token_hex(3)))
    try:
        await story.play()
    except _StoryFailed as exc:  # between rows (the revocation never reached the verifier)
        story.results.append(_failure(len(story.results) + 1, str(exc)))
    except (httpx.HTTPError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"[:300]
        story.results.append(_failure(len(story.results) + 1, problem))
    finally:
        await story.clients.aclose()
    return story.results
