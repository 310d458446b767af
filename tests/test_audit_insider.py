"""The insider battery: someone with write access to the log's database, not its key.

Each case runs against a governed service in its own process over real mTLS
(tests/_verifier_worker.py), on SQLite and on PostgreSQL. The attacker edits
the database between requests (tests/_insider.py, self-consistent forgeries).
Expected every time: the next governed request is denied 503
``audit_unavailable`` and stays so, nothing new is signed, the service logs
one ERROR line, and ``axid audit verify`` with the log's vkey (and the
auditor's trusted checkpoint) exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from _audit_helpers import runner
from _insider import (
    Entry,
    Snapshot,
    append_signed_by,
    checkpoints,
    entries,
    rewrite_tail,
    set_column,
)
from _pg import require_pg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_reliability import HEADER, Stack, Worker, uid, worker, write_config
from test_reliability import stack as stack  # the fixture

from axid.cli import app

pytestmark = pytest.mark.timeout(180)

HIDDEN = "/payments/the-refund-to-hide"


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/payments.db"
    return require_pg()


@contextmanager
def service(stack: Stack, url: str, log: str, name: str = "svc") -> Iterator[Worker]:
    cfg = write_config(stack, stack.verifier_doc(url, log), name)
    with worker(stack, cfg, name) as w:
        yield w


def get(stack: Stack, w: Worker, token: str, path: str) -> httpx.Response:
    with httpx.Client(verify=stack.agent_context(), timeout=10, trust_env=False) as c:
        return c.get(w.url + path, headers={HEADER: token})


def reason(r: httpx.Response) -> str | None:
    if r.headers.get("content-type") != "application/problem+json":
        return None
    return json.loads(r.content).get("reason")


def allow(stack: Stack, w: Worker, token: str, *paths: str) -> str:
    """GET each path (each must be allowed); returns the last answer's AXID-Receipt."""
    for p in paths:
        r = get(stack, w, token, p)
        assert r.status_code == 200, (p, r.status_code, r.text, w.stderr_tail())
    return r.headers["axid-receipt"]


def auditor(*args: str) -> int:
    """Exit status of an `axid audit ...` command, run in-process (the same code the
    console script runs; a subprocess would only add its start-up time)."""
    result = runner.invoke(app, ["audit", *args], env={"NO_COLOR": "1"})
    assert result.exit_code in (0, 1), result.output
    return result.exit_code


def receipt_check(stack: Stack, url: str, log: str, receipt: str) -> int:
    """The caller's check of a receipt it kept: exit status of `axid audit receipt check`."""
    path = stack.tmp / f"receipt-{uid()[:8]}"
    path.write_text(receipt)
    vkey = stack.vkey(log)
    return auditor("receipt", "check", str(path), "--vkey", vkey, "--db", url, "--log", log)


def assert_fails_closed(stack: Stack, w: Worker, token: str, url: str, log: str) -> None:
    """Two more requests: both 503 audit_unavailable, and no new checkpoint."""
    signed = checkpoints(url, log)
    for _ in range(2):
        r = get(stack, w, token, f"/payments/after-{uid()[:8]}")
        assert (r.status_code, reason(r)) == (503, "audit_unavailable"), (r.text, w.stderr_tail())
    assert checkpoints(url, log) == signed, "a checkpoint was signed over the forged state"


def assert_one_error_line(w: Worker) -> None:
    lines = [ln for ln in w.stderr_tail().splitlines() if "integrity check" in ln]
    assert len(lines) == 1, w.stderr_tail()


def audit_verify(stack: Stack, url: str, log: str, trusted: bytes | None) -> int:
    argv = ["verify", "--db", url, "--log", log, "--vkey", stack.vkey(log)]
    if trusted is not None:
        path = stack.tmp / f"trusted-{uid()[:8]}"
        path.write_bytes(trusted)
        argv += ["--trusted-checkpoint", str(path)]
    return auditor(*argv)


def _size(note: bytes) -> int:
    return int(note.split(b"\n")[1])


# --------------------------------------------------------------------------- forged tails

ATTACKS: dict[str, Callable[[list[Entry]], list[Entry]]] = {
    # The allowed request is turned into a deny.
    "rewrite": lambda t: [
        {**e, "decision": "deny", "reason": "scope_insufficient"} if e["path"] == HIDDEN else e
        for e in t
    ],
    "delete": lambda t: [e for e in t if e["path"] != HIDDEN],
    "reorder": lambda t: [t[1], t[0], *t[2:]],
    "insert": lambda t: [t[0], {**t[0], "path": "/payments/never-happened"}, *t[1:]],
}


@pytest.mark.parametrize("drop_checkpoints", [False, True], ids=["keep-cps", "drop-cps"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_forged_tail_after_the_trusted_checkpoint(
    stack: Stack, log_url: str, attack: str, drop_checkpoints: bool
) -> None:
    log = f"p{uid()[:10]}"
    with service(stack, log_url, log) as w:
        token = stack.mint()
        allow(stack, w, token, "/payments/p-1", "/payments/p-2")
        trusted = checkpoints(log_url, log)[-1]  # what the auditor last saw
        m = _size(trusted)
        kept = allow(stack, w, token, HIDDEN)
        allow(stack, w, token, "/payments/p-3")
        assert receipt_check(stack, log_url, log, kept) == 0
        rewrite_tail(
            log_url,
            log,
            m,
            ATTACKS[attack],
            drop_checkpoints_after=m if drop_checkpoints else None,
        )
        assert_fails_closed(stack, w, token, log_url, log)
        assert_one_error_line(w)
    assert audit_verify(stack, log_url, log, trusted) == 1
    assert receipt_check(stack, log_url, log, kept) == 1


# --------------------------------------------------------------------------- rollbacks


@pytest.mark.parametrize("running", [False, True], ids=["while-stopped", "while-running"])
def test_restore_older_copy(stack: Stack, log_url: str, running: bool) -> None:
    log = f"p{uid()[:10]}"
    with service(stack, log_url, log) as w:
        token = stack.mint()
        allow(stack, w, token, "/payments/p-1")
        old = Snapshot(log_url, log, stack.tmp)
        kept = allow(stack, w, token, HIDDEN, "/payments/p-2")
        trusted = checkpoints(log_url, log)[-1]
        if running:
            old.restore()
            assert_fails_closed(stack, w, token, log_url, log)
            assert_one_error_line(w)
    if not running:
        old.restore()
        with service(stack, log_url, log, "svc2") as w:
            assert_fails_closed(stack, w, token, log_url, log)
            assert_one_error_line(w)
    assert audit_verify(stack, log_url, log, trusted) == 1
    assert receipt_check(stack, log_url, log, kept) == 1


def test_restart_after_a_refused_rollback_still_refuses(stack: Stack, log_url: str) -> None:
    # The head file outlives the process: a restart is no way around the check.
    log = f"p{uid()[:10]}"
    with service(stack, log_url, log) as w:
        token = stack.mint()
        allow(stack, w, token, "/payments/p-1")
        old = Snapshot(log_url, log, stack.tmp)
        allow(stack, w, token, "/payments/p-2")
    old.restore()
    for name in ("svc2", "svc3"):
        with service(stack, log_url, log, name) as w:
            assert_fails_closed(stack, w, token, log_url, log)


# --------------------------------------------------------------------------- other writers


def test_second_writer_with_another_key(stack: Stack, log_url: str) -> None:
    log = f"p{uid()[:10]}"
    with service(stack, log_url, log) as w:
        token = stack.mint()
        allow(stack, w, token, "/payments/p-1")
        trusted = checkpoints(log_url, log)[-1]
        append_signed_by(
            log_url, log, Ed25519PrivateKey.generate(), {"path": "/payments/never-happened"}
        )
        assert_fails_closed(stack, w, token, log_url, log)
        assert_one_error_line(w)
    assert audit_verify(stack, log_url, log, trusted) == 1


# --------------------------------------------------------------------------- index columns


def test_index_columns_edited_in_place(stack: Stack, log_url: str) -> None:
    # The signed tree is untouched, so the writer goes on (what it signs is true);
    # the auditor's verify catches the edited row.
    log = f"p{uid()[:10]}"
    with service(stack, log_url, log) as w:
        token = stack.mint()
        kept = allow(stack, w, token, "/payments/p-1", HIDDEN)
        trusted = checkpoints(log_url, log)[-1]
        seq = next(i for i, e in enumerate(entries(log_url, log)) if e["path"] == HIDDEN)
        set_column(log_url, log, seq, "decision", "deny")
        allow(stack, w, token, "/payments/p-2")
    assert audit_verify(stack, log_url, log, trusted) == 1
    assert receipt_check(stack, log_url, log, kept) == 0  # the signed entry itself is intact
