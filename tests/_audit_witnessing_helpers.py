"""The witnessing tests' peers: `axid witness init` and `axid witness serve` as real
processes on loopback, and an independent check of stored cosignatures.

Cosignatures are checked with ``_spec_cosignature`` (written from the C2SP
texts, independent of :mod:`axid.audit.cosignature`); checkpoint bodies are
split from notes here by hand (signed-note: the text ends at the last blank
line).
"""

from __future__ import annotations

import base64
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml
from _spec_cosignature import (
    EM_DASH,
    TYPE_ED25519_COSIGNATURE,
    SpecKey,
    parse_vkey,
    verify_line,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

WAIT = 30.0


def axid_cmd() -> list[str]:
    script = Path(sys.executable).parent / "axid"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from axid.cli import main; main()"]


def witness_init(jobs: Sequence[tuple[Path, str, bool]]) -> list[str]:
    """`axid witness init --name NAME --dir DIR [--ml-dsa]` for each ``(DIR, NAME,
    ML_DSA)``, all at once (each is a process start); returns each
    ``DIR/witness.vkey``'s vkey."""
    procs = [
        subprocess.Popen(
            [
                *axid_cmd(),
                *("witness", "init", "--name", name, "--dir", str(directory)),
                *(["--ml-dsa"] if ml_dsa else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for directory, name, ml_dsa in jobs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
    return [(d / "witness.vkey").read_text().strip() for d, _, _ in jobs]


@dataclass
class Witness:
    """One witness: its key directory, vkey, state database and (while running) URL."""

    name: str
    keys: Path
    vkey: str
    config: Path
    port: int = 0
    url: str | None = None
    _proc: subprocess.Popen[str] | None = None

    @classmethod
    def create(
        cls,
        tmp: Path,
        names: Sequence[str],
        logs: Sequence[tuple[str, str]],
        *,
        ml_dsa: Sequence[str] = (),
    ) -> list[Witness]:
        """Witnesses named ``names``, each for the logs ``(origin, log vkey)``; those
        named in ``ml_dsa`` also have an ML-DSA-44 key."""
        homes = [tmp / f"{i}-{name.replace('/', '_')}" for i, name in enumerate(names)]
        vkeys = witness_init(
            [(h / "keys", n, n in ml_dsa) for h, n in zip(homes, names, strict=True)]
        )
        out = []
        for home, name, vkey in zip(homes, names, vkeys, strict=True):
            w = cls(name, home / "keys", vkey, home / "witness.yaml")
            w._write_config(logs)
            out.append(w)
        return out

    def _write_config(self, logs: Sequence[tuple[str, str]]) -> None:
        doc = {
            "listen": f"127.0.0.1:{self.port}",
            "keys": str(self.keys),
            "database": f"sqlite:///{self.config.parent / 'witness.db'}",
            "logs": [{"origin": o, "vkey": v} for o, v in logs],
        }
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def start(self) -> str:
        """Start `axid witness serve`; the same port as the last run, if there was one."""
        self.spawn()
        return self.wait_listening()

    def spawn(self) -> None:
        assert self._proc is None
        if self.port:
            doc = yaml.safe_load(self.config.read_text())
            doc["listen"] = f"127.0.0.1:{self.port}"
            self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = subprocess.Popen(
            [*axid_cmd(), "witness", "serve", "--config", str(self.config), "--log-level", "error"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self._proc = proc

    def wait_listening(self) -> str:
        assert self._proc is not None
        self.url = _wait_listening(self._proc)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    @property
    def running(self) -> bool:
        return self._proc is not None

    def stop(self, *, check: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            check = False  # it did not start: that error is already raised
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0 or not check, err

    @property
    def spec_key(self) -> SpecKey:
        return parse_vkey(self.vkey)

    @property
    def mldsa_vkey(self) -> str:
        """The vkey of its ML-DSA-44 key (``init --ml-dsa``)."""
        return (self.keys / "witness-mldsa.vkey").read_text().strip()

    def config_entry(self, vkey: str | None = None) -> dict[str, str]:
        """This witness as the log configures it: ``{url, vkey}``."""
        assert self.url is not None
        return {"url": self.url, "vkey": vkey or self.vkey}


@contextmanager
def running(*witnesses: Witness) -> Iterator[None]:
    """The witnesses' `axid witness serve` processes, started at once."""
    try:
        for w in witnesses:
            w.spawn()
        for w in witnesses:
            w.wait_listening()
    except BaseException:
        for w in witnesses:
            w.stop(check=False)
        raise
    try:
        yield
    finally:
        for w in witnesses:
            w.stop()


def other_vkey(name: str) -> str:
    """A cosignature/v1 vkey named ``name`` for a fresh key (signed-note's vkey form:
    name, hex key ID, base64 of type 0x04 and the public key)."""
    public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    key = SpecKey(name, TYPE_ED25519_COSIGNATURE, public)
    return f"{name}+{key.key_id.hex()}+{base64.b64encode(bytes([key.kind]) + public).decode()}"


def _pump(stream: IO[str], q: queue.Queue[str]) -> None:
    for line in stream:
        q.put(line)


def _wait_listening(proc: subprocess.Popen[str]) -> str:
    q: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
    deadline = time.monotonic() + WAIT
    while True:
        try:
            line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            code = proc.poll()
            err = proc.stderr.read() if code is not None and proc.stderr else ""
            raise AssertionError(f"witness did not start: exit {code} {err}") from None
        if line.startswith("listening "):
            return line.removeprefix("listening ").strip()


# --------------------------------------------------------------------------- checks


def split_note(note: bytes) -> tuple[str, list[str]]:
    """A signed note's text (the checkpoint body) and its signature lines."""
    text = note.decode("utf-8")
    split = text.rindex("\n\n")
    assert text.endswith("\n")
    return text[: split + 1], [ln + "\n" for ln in text[split + 2 : -1].split("\n")]


def witness_lines(note: bytes, origin: str) -> list[str]:
    """The note's signature lines after the log's own (first) one, which is by ``origin``."""
    _, lines = split_note(note)
    assert lines[0].startswith(f"{EM_DASH} {origin} "), lines[0]
    assert all(not ln.startswith(f"{EM_DASH} {origin} ") for ln in lines[1:])
    return lines[1:]


def check_cosigned(note: bytes, origin: str, keys: Sequence[SpecKey]) -> set[str]:
    """Names of the ``keys`` whose cosignature on ``note`` verifies (spec oracle);
    every witness line must be by one of them and verify."""
    body, _ = split_note(note)
    names = set()
    by_id = {(k.name, k.key_id): k for k in keys}
    for line in witness_lines(note, origin):
        name, b64 = line[len(EM_DASH) + 1 :].rstrip("\n").split(" ", 1)
        verify_line(line, body, by_id[(name, base64.b64decode(b64)[:4])])
        names.add(name)
    return names
