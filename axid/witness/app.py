"""The witness's HTTP interface: a small ASGI app serving ``POST /add-checkpoint``.

- ``/add-checkpoint`` only (any other path: 404), POST only (other methods:
  405 with ``Allow: POST``); the query string is ignored.
- The body is capped at :data:`MAX_BODY` (64 KiB: 63 proof lines and a
  checkpoint with 16 ML-DSA-44 cosignatures fit): a larger ``Content-Length``
  or body is answered 413 before the body is parsed. A body that does not
  arrive within :data:`BODY_TIMEOUT` seconds: 408.
- Answers: see :mod:`axid.witness.protocol` for the checks and their order.
  200: one cosignature line per witness key (Ed25519 first), ``text/plain;
  charset=utf-8``; 409: ``<size>\\n`` as ``text/x.tlog.size``; every other
  refusal: one short ``text/plain; charset=utf-8`` line. 503 when the state
  database cannot be used (nothing cosigned).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from sqlalchemy.exc import SQLAlchemyError

from axid.audit.cosignature import WitnessSigner
from axid.audit.note import NoteVerifier
from axid.witness.protocol import (
    LogState,
    Outcome,
    Refusal,
    Submission,
    authenticate,
    check_sizes,
    decide,
    parse_body,
)
from axid.witness.store import WitnessStore

__all__ = ["BODY_TIMEOUT", "MAX_BODY", "PATH", "WitnessApp"]

PATH: Final = "/add-checkpoint"
MAX_BODY: Final = 64 * 1024
BODY_TIMEOUT: Final = 10.0
_TEXT: Final = b"text/plain; charset=utf-8"
_SIZE: Final = b"text/x.tlog.size"
_log = logging.getLogger("axid.witness")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _TooLarge(Exception):
    pass


class WitnessApp:
    """ASGI app: the witness's ``add-checkpoint`` over ``store`` with ``signers``."""

    def __init__(
        self,
        logs: Mapping[str, Sequence[NoteVerifier]],
        signers: Sequence[WitnessSigner],
        store: WitnessStore,
        *,
        workers: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not signers:
            raise ValueError("a witness needs at least one key")
        self._logs = logs
        self._signers = tuple(signers)
        self._store = store
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="witness-db")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not served (uvicorn closes the connection)
        if scope["path"] != PATH:
            await _reply(send, 404, _TEXT, b"not found\n")
            return
        if scope["method"] != "POST":
            await _reply(send, 405, _TEXT, b"method not allowed: use POST\n", [(b"allow", b"POST")])
            return
        status, ctype, body = await self._add_checkpoint(scope, receive)
        await _reply(send, status, ctype, body)

    async def _add_checkpoint(self, scope: Scope, receive: Receive) -> tuple[int, bytes, bytes]:
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await _read_body(scope, receive)
        except _TooLarge:
            return 413, _TEXT, f"request body larger than {MAX_BODY} bytes\n".encode()
        except TimeoutError:
            return 408, _TEXT, b"request body timeout\n"
        try:
            sub = parse_body(body)
            authenticate(sub, self._logs)
            check_sizes(sub)
        except Refusal as r:
            return r.status, _TEXT, f"{r.reason}\n".encode()
        loop = asyncio.get_running_loop()
        try:
            outcome, lines = await loop.run_in_executor(self._pool, self._submit, sub, body)
        except SQLAlchemyError as exc:
            _log.error("witness state database unavailable: %s", type(exc).__name__)
            return 503, _TEXT, b"witness state unavailable\n"
        return _answer(sub, outcome, lines)

    def _submit(self, sub: Submission, body: bytes) -> tuple[Outcome, list[str]]:
        def step(stored: LogState) -> tuple[Outcome, list[str]]:
            # Under the origin's lock: the cosignature's time is the decision's.
            outcome = decide(stored, sub, int(self._clock()))
            if outcome.new_state is None:
                return outcome, []
            ts = outcome.new_state.timestamp
            return outcome, [s.cosign(sub.checkpoint, ts) for s in self._signers]

        return self._store.submit(sub.checkpoint.origin, body, self._clock(), step)


def _answer(sub: Submission, outcome: Outcome, lines: list[str]) -> tuple[int, bytes, bytes]:
    cp = sub.checkpoint
    if outcome.status == 200:
        return 200, _TEXT, "".join(lines).encode("utf-8")
    if outcome.evidence:
        _log.error(
            "witness refused log %r: %s (checkpoint size %d, old %d): kept as evidence",
            cp.origin,
            outcome.reason,
            cp.size,
            sub.old_size,
        )
    if outcome.status == 409:
        return 409, _SIZE, f"{outcome.latest_size}\n".encode("ascii")
    return outcome.status, _TEXT, f"{outcome.reason}\n".encode()


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise TimeoutError  # nobody to answer; treated like a body that never came
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reply(
    send: Send,
    status: int,
    ctype: bytes,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(body)).encode("ascii")),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
