"""``AXID-Receipt`` on every recorded response, over real mTLS against real servers
(DESIGN.md, "Evidence that does not depend on the database": receipts).

A governed "payments" service (AxidVerifier under uvicorn) and the issuer (under
uvicorn as ``axid serve`` runs it) answer every decision they recorded, allow or
deny, with ``AXID-Receipt: seq=N, leaf=:B64:, entry=:B64:, checkpoint=:B64:``. Each
receipt is checked without the project's own verifiers: the header is split by a
strict regular expression (and must parse the same with ``Receipt.from_header``),
the entry bytes hash to the leaf (RFC 9162, ``_spec_rfc9162``), the checkpoint's
signature verifies with the log's vkey derived from the log key file (C2SP
signed-note, ``_evidence_helpers``), it covers the seq, the entry says what the
response said, and the log holds exactly those bytes at that seq. A decision that
could not be recorded (503 ``audit_unavailable``) has no receipt.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from _evidence_helpers import (
    Service,
    anonymous_client,
    open_checkpoint,
    payments_service,
    vkey_of,
)
from _issuer_helpers import World, make_world, running, uid
from _spec_rfc9162 import leaf_hash

from axid.audit.receipt import RECEIPT_HEADER, Receipt
from axid.audit.store import LogStore, make_engine
from axid.issuer.client import AsyncIssuerClient, IssuerClient, IssuerError

pytestmark = pytest.mark.timeout(120)

_B64 = r"[A-Za-z0-9+/]*={0,2}"
_HEADER_RE = re.compile(
    rf"seq=(0|[1-9][0-9]*), leaf=:({_B64}):, entry=:({_B64}):, checkpoint=:({_B64}):"
)


@dataclass
class Checked:
    receipt: Receipt
    entry: dict[str, Any]


def check_receipt(response: httpx.Response, vkey: str, log_url: str, log: str) -> Checked:
    """The response's receipt, checked independently (see the module doc)."""
    values = response.headers.get_list(RECEIPT_HEADER)
    assert len(values) == 1, f"expected one {RECEIPT_HEADER}, got {values}"
    match = _HEADER_RE.fullmatch(values[0])
    assert match is not None, values[0]
    seq = int(match.group(1))
    leaf, entry, note = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    assert Receipt.from_header(values[0]) == Receipt(seq, leaf, entry, note)
    assert leaf_hash(entry) == leaf
    checkpoint = open_checkpoint(note, vkey)
    assert checkpoint.size > seq
    doc = json.loads(entry)
    assert doc["seq"] == seq
    engine = make_engine(log_url)
    try:
        [(stored_seq, data, stored_leaf)] = list(LogStore(engine, log).entries(seq, seq + 1))
    finally:
        engine.dispose()
    assert (stored_seq, data, stored_leaf) == (seq, entry, leaf)
    return Checked(Receipt(seq, leaf, entry, note), doc)


def assert_no_receipt(response: httpx.Response) -> None:
    assert RECEIPT_HEADER not in response.headers, response.headers


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("receipts"), "sqlite")
    with running(w):
        yield w


@pytest.fixture
def service(world: World) -> Iterator[Service]:
    with payments_service(world, world.url) as s:
        yield s


def issuer_vkey(w: World) -> str:
    return vkey_of(f"axid/{w.log_name}", w.tmp / "log.pem")


def mint_token(w: World, scope: str = "payments:read") -> str:
    r = w.mint("planner", **w.root_body(scope=scope))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def check_service(service: Service, response: httpx.Response) -> Checked:
    return check_receipt(response, service.vkey(), service.log_url, service.log_name)


def check_issuer(w: World, response: httpx.Response) -> Checked:
    return check_receipt(response, issuer_vkey(w), w.audit_url, w.log_name)


# --------------------------------------------------------------------------- the verifier


def test_verifier_allow_carries_its_receipt(world: World, service: Service) -> None:
    path = f"/payments/{uid()}"
    r = service.client("planner").get(path, headers={"X-Waxell-AXID": mint_token(world)})
    assert r.status_code == 200, r.text
    checked = check_service(service, r)
    e = checked.entry
    assert (e["decision"], e["reason"], e["method"], e["path"]) == ("allow", "ok", "GET", path)
    assert e["peer"] == world.spiffe_id("planner") and e["service"] == "payments"
    # The app saw the same seq on request.state (and echoed it).
    assert r.json()["seq"] == checked.receipt.seq
    assert service.seen[-1] == (path, checked.receipt.seq)


@pytest.mark.parametrize(
    ("method", "headers", "status", "reason"),
    [
        ("GET", {}, 401, "token_missing"),
        ("GET", {"X-Waxell-AXID": "not-a-token"}, 401, "token_malformed"),
        ("DELETE", "token", 403, "scope_insufficient"),  # no rule: denied at step 5
    ],
)
def test_verifier_denies_carry_their_receipts(
    world: World, service: Service, method: str, headers: Any, status: int, reason: str
) -> None:
    if headers == "token":
        headers = {"X-Waxell-AXID": mint_token(world)}
    path = f"/payments/{uid()}"
    r = service.client("planner").request(method, path, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["reason"] == reason
    assert r.headers["www-authenticate"] == f'AXID error="{reason}"'
    e = check_service(service, r).entry
    assert (e["decision"], e["reason"], e["method"], e["path"]) == ("deny", reason, method, path)
    assert all(seen_path != path for seen_path, _ in service.seen)  # the app never ran


def test_unrecorded_decision_has_no_receipt(world: World, service: Service) -> None:
    """503 audit_unavailable: nothing was committed, so there is nothing to receipt."""
    client = service.client("planner")
    token = mint_token(world)
    check_service(service, client.get(f"/payments/{uid()}", headers={"X-Waxell-AXID": token}))
    db = service.log_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(db, timeout=5, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock past the log's lock_timeout
        before = len(service.seen)
        r = client.get(f"/payments/{uid()}", headers={"X-Waxell-AXID": token})
        assert r.status_code == 503 and r.json()["reason"] == "audit_unavailable", r.text
        assert_no_receipt(r)
        assert len(service.seen) == before
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    check_service(service, client.get(f"/payments/{uid()}", headers={"X-Waxell-AXID": token}))


# --------------------------------------------------------------------------- the issuer


def test_issuer_mint_carries_its_receipt(world: World) -> None:
    body = world.root_body()
    r = world.mint("planner", **body)
    assert r.status_code == 201, r.text
    e = check_issuer(world, r).entry
    assert (e["decision"], e["reason"], e["method"], e["path"]) == (
        "allow", "ok", "POST", "/v1/tokens",
    )  # fmt: skip
    assert e["jti"] == r.json()["jti"] and e["run"] == body["run"]
    assert e["peer"] == world.spiffe_id("planner")
    assert r.json()["token"] not in r.headers[RECEIPT_HEADER]


def test_issuer_refusals_carry_their_receipts(world: World) -> None:
    r = world.mint("stranger", **world.root_body())  # not registered
    assert r.status_code == 403 and r.json()["reason"] == "agent_not_allowed", r.text
    e = check_issuer(world, r).entry
    assert (e["decision"], e["reason"]) == ("deny", "agent_not_allowed")
    assert e["peer"] == world.spiffe_id("stranger")

    r = world.client("planner").post(
        "/v1/tokens", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert check_issuer(world, r).entry["reason"] == "bad_request"

    r = world.client("planner").post(
        "/v1/revocations", json={"kind": "run", "value": "r", "reason": "x"}
    )
    assert r.status_code == 403 and r.json()["reason"] == "forbidden"
    e = check_issuer(world, r).entry
    assert (e["decision"], e["reason"], e["path"]) == ("deny", "forbidden", "/v1/revocations")


def test_issuer_revocation_carries_its_receipt(world: World) -> None:
    run = world.run()
    r = world.client("admin").post(
        "/v1/revocations", json={"kind": "run", "value": run, "reason": "test"}
    )
    assert r.status_code == 201, r.text
    e = check_issuer(world, r).entry
    assert (e["decision"], e["reason"], e["path"]) == ("allow", "ok", "/v1/revocations")
    assert e["peer"] == world.spiffe_id("admin")


def test_issuer_unrecorded_answers_have_no_receipt(world: World) -> None:
    """Reads are not decisions: no receipt (nor for an anonymous 401, never recorded)."""
    c = world.client("planner")
    for path in ("/.well-known/jwks.json", "/healthz", "/v1/audit/checkpoint"):
        r = c.get(path)
        assert r.status_code == 200
        assert_no_receipt(r)
    # An anonymous connection (test_public_routes.py has more).
    with anonymous_client(world, world.url) as anonymous:
        r = anonymous.post("/v1/tokens", json=world.root_body())
    assert r.status_code == 401
    assert_no_receipt(r)


# --------------------------------------------------------------------------- the client


def test_issuer_client_returns_the_receipt(world: World) -> None:
    with IssuerClient(world.url, world.source("planner")) as c:
        out = c.mint(
            agent=world.planner, run=world.run(), audience="payments", scope="payments:read"
        )
        with pytest.raises(IssuerError) as refused:
            c.mint(agent="nobody", run=world.run(), audience="payments", scope="payments:read")
    assert out.receipt is not None
    doc = json.loads(out.receipt.entry)
    assert (doc["decision"], doc["jti"]) == ("allow", out.jti)
    assert open_checkpoint(out.receipt.checkpoint, issuer_vkey(world)).size > out.receipt.seq
    assert "receipt" not in repr(out) and out.token not in repr(out)
    assert refused.value.reason == "agent_not_allowed" and refused.value.receipt is not None
    denied = json.loads(refused.value.receipt.entry)
    assert (denied["decision"], denied["reason"]) == ("deny", "agent_not_allowed")
    assert refused.value.receipt.seq > out.receipt.seq


async def test_async_issuer_client_returns_the_receipt(world: World) -> None:
    async with AsyncIssuerClient(world.url, world.source("planner")) as c:
        out = await c.mint(
            agent=world.planner, run=world.run(), audience="payments", scope="payments:read"
        )
    assert out.receipt is not None and json.loads(out.receipt.entry)["jti"] == out.jti
    assert leaf_hash(out.receipt.entry) == out.receipt.leaf_hash
