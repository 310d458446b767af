"""`axid keys` (in-process), `axid token mint|verify` and `axid serve` (real
subprocesses) against a live issuer over mTLS."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _issuer_helpers import ISS, World, make_world, registrations_yaml, running
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from axid.cli._app import app
from axid.issuer.client import AsyncIssuerClient, IssuerClient, IssuerError, check_issuer_url
from axid.keys import Keyring
from mtls.devpki import DevPki, init_dev_pki

WAIT = 30.0


def axid_cmd() -> list[str]:
    script = Path(sys.executable).parent / "axid"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from axid.cli import main; main()"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*axid_cmd(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


# --------------------------------------------------------------------------- axid keys


def test_keys_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "keys")
    r = runner.invoke(app, ["keys", "init", "--dir", d])
    assert r.exit_code == 0, r.output
    ring = Keyring.load(d)
    first = ring.signing_key(time.time()).kid
    assert first in r.output
    assert (Path(d) / f"{first}.pem").stat().st_mode & 0o777 == 0o600
    r = runner.invoke(app, ["keys", "init", "--dir", d])
    assert r.exit_code == 1 and "already exists" in r.output

    r = runner.invoke(app, ["keys", "rotate", "--dir", d, "--publish-lead", "330"])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(app, ["keys", "rotate", "--dir", d])
    assert r2.exit_code == 1 and "pending" in r2.output

    r = runner.invoke(app, ["keys", "list", "--dir", d, "--json"])
    assert r.exit_code == 0
    states = [(k["kid"] == first, k["state"]) for k in json.loads(r.output)["keys"]]
    assert states == [(True, "current"), (False, "next")]
    r = runner.invoke(app, ["keys", "list", "--dir", d])
    assert r.exit_code == 0 and "current" in r.output and "next" in r.output

    r = runner.invoke(app, ["keys", "jwks", "--dir", d])
    assert r.exit_code == 0
    jwks = json.loads(r.output)
    assert len(jwks["keys"]) == 2 and jwks["keys"][0]["kid"] == first
    assert all("d" not in k for k in jwks["keys"])

    r = runner.invoke(app, ["keys", "list", "--dir", str(tmp_path / "none")])
    assert r.exit_code == 1 and "missing" in r.output


# --------------------------------------------------------------------------- axid token


@pytest.fixture
def live(tmp_path: Path) -> Any:
    w = make_world(tmp_path, "sqlite")
    with running(w):
        yield w


def svid_args(w: World, name: str) -> list[str]:
    cert, key = w.cert(name)
    return ["--cert", str(cert), "--key", str(key), "--bundle", str(w.pki.bundle)]


def test_token_mint_and_verify(live: World) -> None:
    w = live
    run_id = w.run()
    r = run(
        "token", "mint", "--issuer", w.url, *svid_args(w, "planner"),
        "--agent", w.planner, "--run", run_id, "--aud", "payments",
        "--scope", "payments:read payments:refund", "--ttl", "60",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert r.stdout == token + "\n" and token.count(".") == 2

    # Verify against the live JWKS over mTLS (URL) ...
    r = run(
        "token", "verify", token, "--jwks", f"{w.url}/.well-known/jwks.json",
        "--iss", ISS, "--aud", "payments", *svid_args(w, "payments"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    claims = json.loads(r.stdout)
    assert claims["sub"] == w.spiffe_id("planner") and claims["run"] == run_id
    assert claims["exp"] - claims["iat"] == 60

    # ... and against a JWKS file, read from stdin; wrong audience / expired: exit 1.
    jwks_file = w.tmp / "jwks.json"
    jwks_file.write_text(w.client("payments").get("/.well-known/jwks.json").text)
    base = ["token", "verify", "-", "--jwks", str(jwks_file), "--iss", ISS]
    r = run(*base, "--aud", "payments", stdin=token)
    assert r.returncode == 0 and json.loads(r.stdout)["jti"] == claims["jti"]
    r = run(*base, "--aud", "ledger", stdin=token)
    assert (r.returncode, r.stdout.strip()) == (1, "token_wrong_audience")
    r = run(*base, "--aud", "payments", "--now", str(claims["exp"] + 1), stdin=token)
    assert (r.returncode, r.stdout.strip()) == (1, "token_expired")
    r = run(*base, "--aud", "payments", stdin="garbage")
    assert (r.returncode, r.stdout.strip()) == (1, "token_malformed")
    r = run("token", "verify", token, "--jwks", str(w.tmp / "nope.json"), "--iss", ISS,
            "--aud", "payments")  # fmt: skip
    assert r.returncode == 2 and "cannot read" in r.stderr

    # A spawned worker, the parent token read from stdin.
    child_run = w.run()
    r = run(
        "token", "mint", "--issuer", w.url, *svid_args(w, "worker"),
        "--agent", w.worker, "--run", child_run, "--aud", "payments",
        "--scope", "payments:read", "--parent", "-",
        stdin=token,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    child = w.verify(r.stdout.strip())
    assert child.spawn_parent == run_id and child.chain == (run_id,)


def test_token_mint_refused(live: World) -> None:
    w = live
    r = run(
        "token", "mint", "--issuer", w.url, *svid_args(w, "worker"),
        "--agent", w.worker, "--run", w.run(), "--aud", "payments",
        "--scope", "payments:delete",
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("scope_insufficient: ")
    # The wrong issuer identity: the TLS handshake fails, exit 2 (unreachable).
    r = run(
        "token", "mint", "--issuer", w.url, *svid_args(w, "worker"),
        "--agent", w.worker, "--run", w.run(), "--aud", "payments",
        "--scope", "payments:read", "--issuer-id", "spiffe://example.org/not/issuer",
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("issuer_unreachable")


def test_issuer_client_library(live: World) -> None:
    w = live
    with IssuerClient(w.url, w.source("planner")) as planner:
        out = planner.mint(agent=w.planner, run=w.run(), audience="payments", scope="payments:read")
        assert "token" not in repr(out)
        assert planner.key_set().get(out.kid) is not None
        with pytest.raises(IssuerError) as info:
            planner.mint(agent="nobody", run=w.run(), audience="payments", scope="payments:read")
        assert (info.value.status, info.value.reason) == (403, "agent_not_allowed")
        with pytest.raises(IssuerError) as info:
            planner.revoke("jti", out.jti, "mine")
        assert info.value.reason == "forbidden"
        assert planner.checkpoint().startswith(f"axid/{w.log_name}\n")
    with IssuerClient(w.url, w.source("admin")) as admin:
        row = admin.revoke("jti", out.jti, "stolen")
        assert row["value"] == out.jti
        feed = admin.revocations(since=row["seq"] - 1)
        assert feed["revocations"][0]["value"] == out.jti and feed["next"] == row["seq"]


async def test_async_issuer_client(live: World) -> None:
    w = live
    async with AsyncIssuerClient(w.url, w.source("planner")) as planner:
        out = await planner.mint(
            agent=w.planner, run=w.run(), audience="payments", scope="payments:read"
        )
        assert w.verify(out.token).jti == out.jti
        assert out.kid in (await planner.key_set()).kids


# --------------------------------------------------------------------------- issuer URLs

BAD_ISSUER_URLS = [
    ("http://127.0.0.1:8443", "https"),
    ("HTTP://127.0.0.1:8443", "https"),
    ("ws://127.0.0.1:8443", "https"),
    ("127.0.0.1:8443", "https"),
    ("https:127.0.0.1:8443", "https"),
    ("https:/127.0.0.1", "https"),
    ("//127.0.0.1:8443", "https"),
    ("", "https"),
    ("https://user:pw@127.0.0.1:8443", "userinfo"),
    ("https://user@127.0.0.1:8443", "userinfo"),
    ("https://@127.0.0.1:8443", "userinfo"),
    ("https://127.0.0.1:8443/?", "query"),
    ("https://127.0.0.1:8443?a=1", "query"),
    ("https://127.0.0.1:8443#", "fragment"),
    ("https://127.0.0.1:8443/x#frag", "fragment"),
    ("https://", "no host"),
    ("https:///v1", "no host"),
    ("https://:8443", "no host"),
    ("https://127.0.0.1:0", "port"),
    ("https://127.0.0.1:65536", "port"),
    ("https://127.0.0.1:x", "port"),
    ("https://127.0.0.1 :8443", "whitespace"),
    ("https://127.0.0.1:8443\n", "whitespace"),
    ("https://127.0.0.1\\@evil.example", "backslash"),
    ("https://issuer.example\u00e9", "non-ASCII"),
    ("https://" + "a" * 2050, "longer"),
    ("https://[::1", "malformed"),
]
GOOD_ISSUER_URLS = [
    "https://127.0.0.1:8443",
    "https://127.0.0.1:8443/",
    "https://[::1]:8443/issuer/prefix",
    "HTTPS://issuer.example.org",
    "https://issuer.example.org:1",
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return init_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(("url", "match"), BAD_ISSUER_URLS)
async def test_issuer_url_refused(pki: DevPki, url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_issuer_url(url)
    source = _source(pki, "planner")
    try:
        with pytest.raises(ValueError, match=match):
            IssuerClient(url, source)
        with pytest.raises(ValueError, match=match):
            AsyncIssuerClient(url, source)
    finally:
        source.close()


@pytest.mark.parametrize("url", GOOD_ISSUER_URLS)
async def test_issuer_url_accepted(pki: DevPki, url: str) -> None:
    assert check_issuer_url(url) == url
    source = _source(pki, "planner")
    try:
        IssuerClient(url, source).close()
        await AsyncIssuerClient(url, source).aclose()
    finally:
        source.close()


def test_issuer_url_type() -> None:
    with pytest.raises(TypeError):
        check_issuer_url(b"https://127.0.0.1")  # type: ignore[arg-type]


_URL_PIECES = st.sampled_from(
    ["https://", "http://", "HTTPS://", "h", "127.0.0.1", ":", "@", "?", "#", "/", "[", "]",
     "\\", "%40", " ", "\n", "8443", "user", "é"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(_URL_PIECES, max_size=8).map("".join) | st.text(max_size=40))
def test_accepted_issuer_urls_are_plain_https(url: str) -> None:
    try:
        check_issuer_url(url)
    except ValueError:
        return
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.hostname
    assert "@" not in parts.netloc and not parts.query and not parts.fragment
    assert "?" not in url and "#" not in url and "\\" not in url
    assert url.isascii() and url.isprintable() and " " not in url


def test_token_mint_refuses_http_issuer(pki: DevPki) -> None:
    cert = pki.directory / "planner.pem"
    key = pki.directory / "planner.key"
    for url in ("http://127.0.0.1:8443", "https://u:p@127.0.0.1:8443", "https://h/?x"):
        r = CliRunner().invoke(
            app,
            [
                "token", "mint", "--issuer", url, "--cert", str(cert), "--key", str(key),
                "--bundle", str(pki.bundle), "--agent", "planner", "--run", "run-1",
                "--aud", "payments", "--scope", "payments:read", "--parent", "-",
            ],
            input="a.parent.token\n",
        )  # fmt: skip
        assert r.exit_code == 2, r.output
        assert "error: the issuer URL" in r.output
        assert "a.parent.token" not in r.output


def _source(pki: DevPki, name: str) -> Any:
    from mtls.sources import FileSource

    return FileSource(pki.directory / f"{name}.pem", pki.directory / f"{name}.key", pki.bundle)


# --------------------------------------------------------------------------- axid serve


def _lines(stream: Any, q: queue.Queue[str]) -> None:
    for line in stream:
        q.put(line)


def test_axid_serve_subprocess(tmp_path: Path) -> None:
    w = make_world(tmp_path, "sqlite")
    (tmp_path / "registrations.yaml").write_text(registrations_yaml(w))
    cert, key = w.cert("issuer")
    (tmp_path / "axid.yaml").write_text(
        f"""
issuer: {ISS}
host: 127.0.0.1
port: 8443
svid: {{cert: {cert}, key: {key}, bundle: {w.pki.bundle}}}
keys_dir: keys
registrations: registrations.yaml
admins: ["spiffe://example.org/admin/*"]
audit: {{log: {w.log_name}, key: keys/log.pem}}
"""
    )
    env = dict(os.environ)
    env.pop("AXID_DATABASE_URL", None)
    proc = subprocess.Popen(
        [
            *axid_cmd(), "serve", "--config", str(tmp_path / "axid.yaml"), "--port", "0",
            "--db", f"sqlite:///{tmp_path}/state.db", "--log-level", "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    q: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, q), daemon=True).start()
    try:
        lines: list[str] = []
        deadline = time.monotonic() + WAIT
        while "ready\n" not in lines:
            try:
                lines.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"axid serve did not get ready: {lines} {proc.poll()}")
        url = lines[0].removeprefix("issuer: ").strip()
        assert url.startswith("https://127.0.0.1:") and not url.endswith(":0")
        with IssuerClient(url, w.source("planner")) as planner:
            out = planner.mint(
                agent=w.planner, run=w.run(), audience="payments", scope="payments:read"
            )
        assert (tmp_path / "keys" / "keyring.json").exists()
        assert (tmp_path / "keys" / "log.pem").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state.db").exists()
        assert out.expires_at > time.time()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def test_axid_serve_bad_config(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("registrations: r.yaml\nbogus: 1\n")
    r = run("serve", "--config", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "bogus" in r.stderr
    r = run("serve")
    assert r.returncode == 2
