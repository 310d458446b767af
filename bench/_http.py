"""Loopback HTTP plumbing shared by the HTTP benchmarks (:mod:`bench.issuer`,
:mod:`bench.witness`): a server child process (its environment, its first
stdout line, its stderr tail, its stop) and the HTTP/1.1 answer framing of the
benchmark clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from bench._harness import BenchError

_ROOT: Final = Path(__file__).resolve().parent.parent  # holds the axid and bench packages
_STOP_TIMEOUT: Final = 10.0
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*\r\n", re.I)


# --------------------------------------------------------------------------- child processes


def child_env() -> dict[str, str]:
    """This environment, with this checkout first on the child's import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def first_line(proc: subprocess.Popen[bytes], deadline: float, who: str, stderr: Path) -> str:
    """The first line ``proc`` writes to its stdout, by ``deadline`` (monotonic);
    BenchError, naming ``who``, when it exits or does not say it in time."""
    out = proc.stdout
    assert out is not None
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{who} did not start in time{stderr_tail(stderr)}")
        ready, _, _ = select.select([out], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=_STOP_TIMEOUT)
                raise BenchError(f"{who} exited ({proc.returncode}){stderr_tail(stderr)}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode("ascii", "replace").strip()


def stderr_tail(path: Path) -> str:
    """The last lines of a child's stderr file, as a message suffix (empty when none)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip()
        if text:
            return ": ..." + " | ".join(text.splitlines()[-6:])[-600:]
    return ""


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Graceful stop (stdin closed when piped, SIGTERM), then a kill if it lingers;
    its pipes closed."""
    if proc.poll() is None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


# --------------------------------------------------------------------------- answers


class AnswerProtocol(asyncio.Protocol):
    """A keep-alive client connection reading ``Content-Length`` framed answers;
    a failure settles ``done`` (when a round waits on it)."""

    def __init__(self, label: str, max_head: int) -> None:
        self.label = label
        self.max_head = max_head
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def _answer(self, data: bytes) -> tuple[bytes, bytes, bool] | None:
        """``data`` added; the answer it completes (see :func:`take_answer`), or None
        (incomplete, or a framing failure, ``done`` then failed)."""
        self.buf += data
        try:
            return take_answer(self.buf, self.label, self.max_head)
        except BenchError as exc:
            self._fail(exc)
            return None


def take_answer(buf: bytearray, label: str, max_head: int) -> tuple[bytes, bytes, bool] | None:
    """One ``Content-Length`` framed HTTP/1.1 answer from ``buf``: ``(status, body,
    extra)`` once whole (``buf`` then emptied; ``extra``: more bytes followed it),
    None while it is not. BenchError for an oversized head or no Content-Length."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > max_head:
            raise BenchError(f"{label}: oversized answer head")
        return None
    m = _CONTENT_LENGTH.search(buf, 0, end + 2)
    if m is None:
        raise BenchError(f"{label}: an answer without Content-Length")
    total = end + 4 + int(m[1])
    if len(buf) < total:
        return None
    status, body = bytes(buf[9:12]), bytes(buf[end + 4 : total])
    extra = len(buf) > total
    buf.clear()
    return status, body, extra
