"""`axid demo`, run as the README runs it: the real `axid` script in a subprocess.

The demo starts a witness, the issuer and the governed "payments" service (mTLS)
on loopback, both logs witnessed (async, quorum 1), plays the story, waits for the
witness's cosignatures of the latest checkpoints, verifies the decision logs (the
payments log with ``axid audit verify ... --witness ... --quorum 1``) and checks
the refund's receipt with ``axid audit receipt check``; these tests check its exit
code and output, and with ``--keep-running`` verify a cosignature on the payments
log's checkpoint with the spec oracle (``tests/_spec_cosignature.py``, not AXID's
code) and make a real mTLS call of their own (mint at the printed issuer, GET at
the printed payments URL, with the planner SVID from the printed certs directory)
before stopping it with SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import _spec_cosignature as spec
import httpx
import pytest
from rich.console import Console

import axid.witness.server
from axid.audit import DecisionLog
from axid.audit.cosignature import WitnessKey
from axid.audit.note import NoteSigner
from axid.audit.quorum import WitnessPolicy
from axid.audit.receipt import Receipt
from axid.audit.store import generate_log_key, origin_for
from axid.audit.verify import DatabaseSource, verify_log
from axid.demo import audit as demo_audit
from axid.demo import provisioning
from axid.demo import run as demo_run
from axid.demo import stack as demo_stack
from axid.demo.audit import check_kept_receipt
from axid.demo.payments import create_payments_app
from axid.demo.provisioning import DemoLayout, DemoUsageError, prepare_directory, provision
from axid.demo.run import run_demo
from axid.demo.stack import DemoStack
from axid.demo.steps import RECEIPT_STEP, STEPS, STORY_STEPS, Call
from axid.issuer.client import IssuerClient
from axid.witness import WitnessApp, WitnessStartupError
from mtls.sources import FileSource
from mtls.spiffeid import SpiffeId
from mtls.tlsconfig import client_context

AXID_BIN = str(Path(sys.executable).parent / "axid")
WAIT = 60.0
# Every deny the story must show, by its reason code.
STORY_REASONS = (
    "replayed",
    "scope_insufficient",
    "cert_binding_mismatch",
    "subject_mismatch",
    "token_expired",
    "revoked",
    "approval_required",
    "approval_invalid",
)

WITNESS = "witness.example.org/demo"  # the demo's witness name (trust domain example.org)

pytestmark = pytest.mark.timeout(120)


def _env() -> dict[str, str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("AXID_DATABASE_URL", None)
    return env


def test_demo_plays_the_whole_story(tmp_path: Path) -> None:
    done = subprocess.run(
        [AXID_BIN, "demo"],
        capture_output=True,
        text=True,
        timeout=WAIT * 1.5,
        cwd=tmp_path,
        env=_env(),
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for reason in STORY_REASONS:
        assert re.search(rf"\b{reason}\b", out), f"{reason} missing from:\n{out}"
    assert "tls: " in out  # the call without a client certificate: refused by TLS
    assert "chain planner-" in out and " → worker-" in out  # the spawn chain
    assert re.search(r"audit verify: OK \(\d+ entries, \d+ checkpoints\) log payments", out)
    assert re.search(r"audit verify: OK \(\d+ entries, \d+ checkpoints\) log issuer", out)
    assert "— axid/payments " in out  # the signed checkpoint note
    # Async witnessing: the demo waited for the cosignatures of the latest checkpoints,
    # and both logs' latest checkpoint (size = entries) is the witnessed one.
    waited = re.search(
        rf"^witness: {WITNESS} cosigned the logs' latest checkpoints "
        r"\(issuer (\d+), payments (\d+)\); witnessing is async .* the demo waited "
        r"[0-9.]+ s for it, at most 10 s$",
        out,
        re.M,
    )
    assert waited, out
    for log, size in (("issuer", waited.group(1)), ("payments", waited.group(2))):
        assert re.search(
            rf"^audit verify: OK \({size} entries, \d+ checkpoints\) log {log} in \S+; "
            rf"witnessed: checkpoint {size} cosigned by {WITNESS}$",
            out,
            re.M,
        ), out
    assert f"\n— {WITNESS} " in out  # the printed note carries the witness's cosignature
    # The auditor's CLI, with the witness's vkey and a quorum of 1.
    assert re.search(
        r"^\$ axid audit verify --db sqlite:///\S+/axid\.db --log payments "
        r"--vkey /\S+/keys/payments\.vkey --witness /\S+/keys/witness\.vkey --quorum 1 "
        r"--max-unwitnessed 0$",
        out,
        re.M,
    ), out
    assert "  OK: the log is intact and witnessed" in out
    assert re.search(
        rf"^  witnessed: +checkpoint {waited.group(2)}, cosigned by {WITNESS} "
        rf"\(quorum 1 of {WITNESS}\); 0 entries after it$",
        out,
        re.M,
    ), out
    assert "audit verify --witness: OK the payments log" in out
    # Every recorded step's answer carried a receipt for its very log entry.
    rows = re.findall(r"^ *(\d+) .* (issuer|payments) #(\d+) +(\S+) +✓ *$", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(1, 18)), out
    assert all(receipt == seq for _n, _log, seq, receipt in rows), rows
    assert re.search(r"^ *18 +anonymous .* — +— +✓ *$", out, re.M), out  # nothing recorded
    # The DELETE waits for the admin's approval, then passes once, naming the approver.
    assert re.search(r"approval \S+ by spiffe://example\.org/ops/admin", out), out
    # The refund's receipt (step 4), checked by the real CLI with the payments vkey.
    _n, log, seq, _receipt = rows[3]
    assert log == "payments"
    assert re.search(
        r"^\$ axid audit receipt check /\S+/refund\.receipt --vkey /\S+/keys/payments\.vkey "
        r"--db sqlite:///\S+/axid\.db --log payments$",
        out,
        re.M,
    ), out
    assert "  OK: the log holds the receipted entry and extends the receipted checkpoint" in out
    checked = f"audit receipt check: OK the receipt of step 4 (seq {seq}) against the payments log"
    assert checked in out
    assert "demo: all 18 steps did what they should, both logs verify and are witnessed" in out
    assert "FAILED" not in out
    # Without --dir the demo's temporary directory is gone afterwards.
    db = re.search(r"log payments in sqlite:///(\S+)", out)
    assert db is not None
    assert not Path(db.group(1)).parent.exists()
    assert not list(tmp_path.iterdir())  # nothing written to the working directory


def test_demo_fails_when_its_receipt_does_not_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep the first mint's receipt instead: an issuer receipt, which the CLI refuses
    # to check against the payments log with the payments vkey (exit 2).
    monkeypatch.setattr(demo_run, "RECEIPT_STEP", 1)
    monkeypatch.delenv("AXID_DATABASE_URL", raising=False)
    buf = io.StringIO()
    code = run_demo(
        tmp_path / "d", console=Console(file=buf, width=200, highlight=False, markup=False)
    )
    out = buf.getvalue()
    assert code == 1, out
    assert "audit receipt check: FAILED (exit 2) the receipt of step 1 (seq 0)" in out
    assert "demo: FAILED: the receipt of step 1 does not check" in out
    assert "demo: all 18 steps" not in out


def _entry_fields(tag: str) -> dict[str, object]:
    return {"decision": "allow", "reason": "ok", "method": "GET", "path": f"/payments/{tag}"}


def test_check_kept_receipt_runs_the_cli(tmp_path: Path) -> None:
    """Held in its own log: exit 0; a fork (the same key, another database): exit 1."""
    key = tmp_path / "payments-log.pem"
    vkey = NoteSigner(origin_for("payments"), generate_log_key(key)).vkey()
    layouts = [prepare_directory(tmp_path / name) for name in ("mine", "fork")]

    async def record() -> list[Receipt]:
        receipts = []
        for layout in layouts:
            layout.keys.mkdir()
            layout.vkey_file("payments").write_text(vkey + "\n", encoding="ascii")
            log = await DecisionLog.open(
                layout.db_url, log="payments", key=key, head=layout.keys / "payments.head"
            )
            try:
                for i in range(3):
                    receipts.append(await log.append(_entry_fields(f"{layout.root.name}-{i}")))
            finally:
                await log.close()
        return receipts

    receipt = asyncio.run(record())[1]
    mine, fork = layouts
    held = asyncio.run(check_kept_receipt(mine, "payments", receipt))
    assert held.ok and held.code == 0, held.output
    assert held.output.startswith("OK: the log holds the receipted entry")
    assert mine.receipt_file.read_text(encoding="ascii") == (
        f"AXID-Receipt: {receipt.header_value()}\n"
    )
    forked = asyncio.run(check_kept_receipt(fork, "payments", receipt))
    assert forked.code == 1 and not forked.ok, forked.output
    assert forked.output.startswith("NOT HELD: ")


def test_demo_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    done = subprocess.run(
        [AXID_BIN, "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_env(),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is not empty" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_demo_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    done = subprocess.run(
        [AXID_BIN, "demo", "--dir", str(tmp_path / "d"), "--trust-domain", "Example.org"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_env(),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "invalid trust domain" in done.stderr
    assert not (tmp_path / "d").exists()


def test_prepare_directory(tmp_path: Path) -> None:
    layout = prepare_directory(tmp_path / "new" / "demo")
    assert layout.root.is_dir() and layout.db_url == f"sqlite:///{layout.root}/axid.db"
    assert prepare_directory(layout.root).root == layout.root  # empty: fine
    (layout.root / "x").write_text("")
    with pytest.raises(DemoUsageError, match="not empty"):
        prepare_directory(layout.root)
    with pytest.raises(DemoUsageError, match="not a directory"):
        prepare_directory(layout.root / "x")


def test_payments_app_needs_a_verifier_config() -> None:
    with pytest.raises(TypeError):
        create_payments_app({"service": "payments"})  # type: ignore[arg-type]


def test_demo_serves_its_witness_as_axid_witness_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's witness: witness.yaml as `axid witness init` and the config schema
    want it, and the uvicorn options axid.witness.server.serve gives that config."""
    layout = prepare_directory(tmp_path / "d")
    provisioned = provision(layout)
    assert (layout.witness_dir / "keys" / "witness.key").stat().st_mode & 0o077 == 0
    published = layout.witness_vkey_file.read_text(encoding="ascii")
    assert published == (layout.witness_dir / "keys" / "witness.vkey").read_text(encoding="ascii")
    assert published.strip() == provisioned.witness_vkey
    assert spec.parse_vkey(published).name == WITNESS
    parts = demo_stack._open_witness(layout.witness_config)
    try:
        assert set(parts.config.logs) == {"axid/issuer", "axid/payments"}
        assert (parts.config.host, parts.config.port, parts.config.tls) == ("127.0.0.1", 0, None)
        ours = demo_stack.witness_uvicorn_config(parts.app, parts.config, log_level="warning")
    finally:
        parts.close()

    built: list[object] = []

    class Capture:  # stands in for uvicorn.Server: records the config, never serves
        def __init__(self, config: object) -> None:
            built.append(config)
            self.started = False
            self.should_exit = False

        async def serve(self, sockets: object = None) -> None:
            return None

    monkeypatch.setattr(axid.witness.server.uvicorn, "Server", Capture)
    with pytest.raises(WitnessStartupError):
        axid.witness.server.serve(parts.config, ready=lambda _url: None, log_level="warning")
    (theirs,) = built
    assert isinstance(ours.app, WitnessApp) and isinstance(theirs.app, WitnessApp)  # type: ignore[attr-defined]
    assert {k: v for k, v in vars(ours).items() if k != "app"} == {
        k: v for k, v in vars(theirs).items() if k != "app"
    }


def test_the_story_is_a_table() -> None:
    """The printed story is STEPS, in order: 18 rows, every deny the README names, and
    the kept receipt is the allowed refund's."""
    assert len(STEPS) == STORY_STEPS == 18
    assert {step.expect[1] for step in STEPS} >= set(STORY_REASONS)
    refund = STEPS[RECEIPT_STEP - 1]
    assert isinstance(refund.request, Call)
    assert (refund.request.method, refund.request.path) == ("POST", "/payments/p-1001/refund")
    assert refund.expect == (200, "ok")
    assert [step.recorded for step in STEPS] == [True] * 17 + [False]  # the TLS refusal


def test_demo_servers_set_tcp_nodelay(tmp_path: Path) -> None:
    """Every connection the demo's witness, issuer and payments accept has TCP_NODELAY,
    as axid witness serve's and axid serve's do: no answer written in two parts waits
    ~40 ms for the client's delayed ACK."""
    provisioned = provision(prepare_directory(tmp_path / "d"))
    certs = provisioned.layout.certs

    async def main() -> dict[str, list[int]]:
        async with DemoStack(provisioned) as stack:
            source = FileSource(certs / "planner.pem", certs / "planner.key", certs / "bundle.pem")
            clients = [
                httpx.AsyncClient(
                    verify=client_context(source, server_id=provisioned.spiffe_id(server)),
                    trust_env=False,
                )
                for server in ("issuer", "payments")
            ]
            clients.append(httpx.AsyncClient(trust_env=False))
            try:
                urls = (stack.issuer_url, stack.payments_url, stack.witness_url)
                for client, url in zip(clients, urls, strict=True):
                    await client.get(f"{url}/healthz")  # any answer: the connection stays
                # The connections are still open (keep-alive): read the servers' side.
                return {
                    name: [
                        conn.transport.get_extra_info("socket").getsockopt(
                            socket.IPPROTO_TCP, socket.TCP_NODELAY
                        )
                        for conn in server.server_state.connections
                    ]
                    for name, server in stack.servers().items()
                }
            finally:
                for client in clients:
                    await client.aclose()
                source.close()

    nodelay = asyncio.run(main())
    assert set(nodelay) == {"witness", "issuer", "payments"}
    for name, flags in nodelay.items():
        assert flags and all(flags), (name, flags)


def test_demo_fails_when_the_witness_does_not_cosign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The witness is told another key for the payments log: it refuses (403) every
    # checkpoint of it, so the demo's bounded wait and the auditor's verify fail.
    wrong = NoteSigner(origin_for("payments"), generate_log_key(tmp_path / "wrong.pem")).vkey()
    provision_witness = provisioning._provision_witness

    def misconfigured(layout: DemoLayout, name: str, vkeys: dict[str, str]) -> str:
        return provision_witness(layout, name, {**vkeys, "payments": wrong})

    monkeypatch.setattr(provisioning, "_provision_witness", misconfigured)
    monkeypatch.setattr(demo_audit, "COSIGN_WAIT", 0.5)
    monkeypatch.delenv("AXID_DATABASE_URL", raising=False)
    buf = io.StringIO()
    code = run_demo(
        tmp_path / "d", console=Console(file=buf, width=200, highlight=False, markup=False)
    )
    out = buf.getvalue()
    assert code == 1, out
    assert re.search(
        rf"^witness: FAILED: {WITNESS} did not cosign the logs' latest checkpoints "
        r"\(issuer \d+, payments (\d+)\) within 0\.5 s; it has cosigned issuer \d+, payments 0$",
        out,
        re.M,
    ), out
    assert re.search(r"^audit verify: OK .* log issuer in \S+; witnessed: checkpoint", out, re.M)
    assert re.search(
        r"^audit verify: NOT WITNESSED log payments \(intact: (\d+) entries, \1 checkpoints\): ",
        out,
        re.M,
    ), out
    assert "  NOT WITNESSED: " in out  # the CLI's verdict
    assert "audit verify --witness: FAILED (exit 1) the payments log" in out
    assert "demo: FAILED: the logs' latest checkpoints are not witnessed" in out
    assert "demo: all 18 steps" not in out


class _Lines:
    """Reads a child's stdout on a thread (to the end, so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, wanted: str) -> list[str]:
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError("timed out; output so far:\n" + "\n".join(self.seen)) from None
            if line is None:
                raise AssertionError("the demo ended early:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if line == wanted:
                return self.seen


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_keep_running_serves_until_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    demo_dir = tmp_path / "demo"
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(
            [AXID_BIN, "demo", "--dir", str(demo_dir), "--keep-running"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(),
        )
        try:
            lines = _Lines(proc).until("ready")
            fields = dict(line.split(": ", 1) for line in lines[-7:-1])
            assert list(fields) == ["issuer", "payments", "witness", "certs", "keys", "audit"], (
                lines[-7:]
            )
            assert re.fullmatch(r"https://127\.0\.0\.1:\d+", fields["issuer"])
            assert re.fullmatch(r"https://127\.0\.0\.1:\d+", fields["payments"])
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", fields["witness"])
            certs = Path(fields["certs"])
            assert certs == demo_dir.resolve() / "certs"
            keys = Path(fields["keys"])
            assert keys == demo_dir.resolve() / "keys"
            for vkey in ("issuer.vkey", "payments.vkey", "witness.vkey"):
                assert (keys / vkey).is_file(), vkey
            assert fields["audit"] == f"sqlite:///{demo_dir.resolve()}/axid.db"
            assert "demo: all 18 steps did what they should" in "\n".join(lines)
            source = FileSource(certs / "planner.pem", certs / "planner.key", certs / "bundle.pem")
            payments_id = SpiffeId.parse("spiffe://example.org/svc/payments")

            # The payments log's latest checkpoint, as its read route serves it: cosigned
            # by the witness, checked here with the spec oracle and the published vkey.
            try:
                ctx = client_context(source, server_id=payments_id)
                with httpx.Client(verify=ctx, timeout=10, trust_env=False) as client:
                    served = client.get(f"{fields['payments']}/.well-known/axid/log/checkpoint")
            except BaseException:
                source.close()
                raise
            assert served.status_code == 200, served.text
            size = _check_cosigned(served.text, (keys / "witness.vkey").read_text())
            assert size == _logged_entries(lines)
            # The printed witness URL is the live witness: a malformed submission is a 400.
            answer = httpx.post(f"{fields['witness']}/add-checkpoint", content=b"x", timeout=10)
            assert answer.status_code == 400, answer.text

            # By hand, as a user would: the planner mints at the issuer, then reads.
            run = f"by-hand-{uuid.uuid4().hex[:8]}"
            try:
                with IssuerClient(fields["issuer"], source) as issuer:
                    minted = issuer.mint(
                        agent="planner", run=run, audience="payments", scope="payments:read"
                    )
                with httpx.Client(verify=ctx, timeout=10, trust_env=False) as client:
                    response = client.get(
                        f"{fields['payments']}/payments/p-1002",
                        headers={"X-Waxell-AXID": minted.token},
                    )
            finally:
                source.close()
            assert response.status_code == 200, response.text
            by = response.json()["by"]
            assert (by["tenant"], by["agent"], by["run"]) == ("acme", "planner", run)

            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # What the demo left in --dir verifies, with the published vkeys, and holds our call;
    # the witness cosigned it up to the demo's checkpoint at least.
    vkey = (keys / "payments.vkey").read_text().strip()
    witness = WitnessKey.from_vkey((keys / "witness.vkey").read_text().strip())
    source_db = DatabaseSource(fields["audit"], "payments")
    try:
        report = verify_log(source_db, vkey=vkey, witnesses=WitnessPolicy((witness,), 1))
    finally:
        source_db.close()
    assert report.ok, (report.first_bad, report.witness_failure)
    assert report.entries == _logged_entries(lines) + 1  # the story's, then ours
    assert report.witnessed_size is not None and report.witnessed_size >= size
    assert report.cosigners == (WITNESS,)


def _check_cosigned(note: str, witness_vkey: str) -> int:
    """The size of a signed checkpoint note that carries a cosignature by the witness
    which verifies (spec oracle); the log's origin is axid/payments."""
    body, _, signatures = note.partition("\n\n")
    body += "\n"
    origin, size, _root = spec.checkpoint_fields(body)
    assert origin == "axid/payments"
    key = spec.parse_vkey(witness_vkey)
    assert key.name == WITNESS and key.kind == spec.TYPE_ED25519_COSIGNATURE
    mine = [ln for ln in signatures.splitlines() if ln.startswith(f"{spec.EM_DASH} {WITNESS} ")]
    assert len(mine) == 1, note
    timestamp = spec.verify_line(mine[0], body, key)
    assert abs(timestamp - time.time()) < 600
    return size


def _logged_entries(lines: list[str]) -> int:
    """The payments log's size as the demo reported it before "ready"."""
    for line in lines:
        m = re.match(r"audit verify: OK \((\d+) entries, \d+ checkpoints\) log payments", line)
        if m:
            return int(m.group(1))
    raise AssertionError("no audit verify line for the payments log")
