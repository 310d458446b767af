"""The log's side of the witness tests, and `axid witness serve` as a real process.

Checkpoints are signed with :mod:`axid.audit.note` and proofs made with
:mod:`axid.audit.merkle`: those are the log's code, not the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from _spec_cosignature import SpecKey, parse_vkey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.merkle import ListNodes, consistency_proof, empty_root
from axid.audit.note import Checkpoint, NoteSigner, sign_checkpoint

WAIT = 30.0


def axid_cmd() -> list[str]:
    script = Path(sys.executable).parent / "axid"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from axid.cli import main; main()"]


def run_axid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*axid_cmd(), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )


def unique_origin(prefix: str = "example.org/axid") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- the log side


@dataclass
class LogSide:
    """A log: its origin, Ed25519 key and leaves; signs checkpoints, makes proofs."""

    origin: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    leaves: list[bytes] = field(default_factory=list)
    tag: bytes = b"main"

    @property
    def signer(self) -> NoteSigner:
        return NoteSigner(self.origin, self.key)

    @property
    def vkey(self) -> str:
        return self.signer.vkey()

    def grow(self, size: int) -> LogSide:
        while len(self.leaves) < size:
            n = len(self.leaves)
            self.leaves.append(hashlib.sha256(self.tag + n.to_bytes(8, "big")).digest())
        return self

    def fork(self, at: int, tag: bytes = b"fork") -> LogSide:
        """Another history under the same key: the first ``at`` leaves, then others."""
        return LogSide(self.origin, self.key, list(self.leaves[:at]), tag)

    def _nodes(self) -> ListNodes:
        return ListNodes(self.leaves)

    def root(self, size: int) -> bytes:
        return empty_root() if size == 0 else self._nodes().root(size)

    def checkpoint(self, size: int) -> Checkpoint:
        return Checkpoint(self.origin, size, self.root(size))

    def note(self, size: int, signer: NoteSigner | None = None) -> bytes:
        return sign_checkpoint(self.checkpoint(size), signer or self.signer)

    def proof(self, old: int, size: int) -> list[bytes]:
        if old == 0 or old == size:
            return []
        return consistency_proof(old, size, self._nodes())

    def body(
        self,
        old: int,
        size: int,
        *,
        proof: Sequence[bytes] | None = None,
        note: bytes | None = None,
    ) -> bytes:
        lines = self.proof(old, size) if proof is None else proof
        head = f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in lines)
        return head.encode() + b"\n" + (self.note(size) if note is None else note)


def body_text(log: LogSide, size: int) -> str:
    """The checkpoint body (note text) of ``size``: what cosignatures sign."""
    return log.checkpoint(size).to_text()


# --------------------------------------------------------------------------- the witness


@dataclass(frozen=True)
class WitnessDir:
    keys: Path
    ed25519: SpecKey
    mldsa: SpecKey | None


def init_witness(
    tmp: Path, name: str = "witness.example/w1", *, ml_dsa: bool = False
) -> WitnessDir:
    """Keys via the library (fast); the CLI itself is tested in test_witness_cli."""
    from axid.witness import init_keys

    keys = tmp / "wkeys"
    made = init_keys(keys, name, ml_dsa=ml_dsa)
    spec = [parse_vkey(k.vkey()) for k in made]
    return WitnessDir(keys, spec[0], spec[1] if ml_dsa else None)


def write_config(
    path: Path, *, keys: Path, database: str, logs: Sequence[LogSide], **extra: Any
) -> Path:
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "keys": str(keys),
        "database": database,
        "logs": [{"origin": lg.origin, "vkey": lg.vkey} for lg in logs],
        **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _pump(stream: IO[str], q: queue.Queue[str]) -> None:
    for line in stream:
        q.put(line)


def _start(
    config: Path, env: dict[str, str] | None
) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen(
        [*axid_cmd(), "witness", "serve", "--config", str(config), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else dict(os.environ),
    )
    q: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
    return proc, q


def _wait_stopped(proc: subprocess.Popen[str]) -> None:
    """Wait for a process sent one SIGTERM (a second one could kill it mid-shutdown)."""
    try:
        code = proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    err = proc.stderr.read() if proc.stderr else ""
    assert code == 0, f"exit {code}: {err}"


@contextmanager
def serving_many(
    config: Path, processes: int, *, env: dict[str, str] | None = None
) -> Iterator[list[str]]:
    """``processes`` x `axid witness serve --config CONFIG`, started together; their URLs."""
    started = [_start(config, env) for _ in range(processes)]
    try:
        yield [_wait_listening(proc, q) for proc, q in started]
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in started:
            _wait_stopped(proc)


@contextmanager
def serving(config: Path, *, env: dict[str, str] | None = None) -> Iterator[str]:
    """`axid witness serve --config CONFIG` as a subprocess; yields its base URL."""
    with serving_many(config, 1, env=env) as urls:
        yield urls[0]


def _wait_listening(proc: subprocess.Popen[str], q: queue.Queue[str]) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise AssertionError(f"witness did not start: exit {proc.poll()} {err}") from None
        if line.startswith("listening "):
            url = line.removeprefix("listening ").strip()
            assert not url.endswith(":0"), url
            return url


def add_checkpoint(client: httpx.Client, url: str, body: bytes) -> httpx.Response:
    return client.post(f"{url}/add-checkpoint", content=body)
