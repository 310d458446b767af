"""The decision log's public read routes (DESIGN.md, "Evidence": public read routes).

Every service behind :class:`~verifier.middleware.AxidVerifier` serves, ungoverned and
unrecorded, to any peer that passed its TLS::

    GET /.well-known/axid/log/checkpoint                    the latest signed checkpoint
    GET /.well-known/axid/log/proof?seq=N[&size=S]          C2SP tlog-proof of entry N
    GET /.well-known/axid/log/consistency?old=M[&size=N]    tlog-witness add-checkpoint form

The middleware answers them itself (:func:`serve_log_route`), before any rule is
matched: the app never sees them, no token is needed, nothing is logged. The
issuer serves the same texts under ``/v1/audit/*`` with :func:`read_log`.

Rules, the same on both: ``size`` (default: the latest checkpoint) must be the size
of a stored checkpoint, else 404 ``not_found`` (also for a log with no checkpoint
yet); ``seq < size`` and ``old <= size``, else 400 ``bad_request``; ``old`` = 0 or
``old`` = size gives an empty proof. The query is strict: only the route's own
parameters, each at most once, each a decimal integer without sign, leading zero
or percent-encoding; anything else is 400 ``bad_request``. A database failure is
503 ``audit_unavailable``. Only GET is served: HEAD and every other method get 405
with ``Allow: GET`` (a HEAD would cost the same database reads as a GET).

Errors are RFC 9457 problem+json in the verifier's deny shape. The store's calls are
synchronous database reads: they run on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Literal

from sqlalchemy.exc import SQLAlchemyError

from axid.audit.note import Checkpoint, NoteError
from axid.audit.store import LogStore, NotFound, consistency_text, proof_text
from verifier.errors import VerifierError
from verifier.responses import problem_json

__all__ = [
    "LOG_ROUTES",
    "LogReadError",
    "LogRoute",
    "read_log",
    "serve_log_route",
]

_log = logging.getLogger(__name__)

LogRoute = Literal["checkpoint", "proof", "consistency"]

# The verifier's paths, and which read each one is.
LOG_ROUTES: Final[dict[str, LogRoute]] = {
    "/.well-known/axid/log/checkpoint": "checkpoint",
    "/.well-known/axid/log/proof": "proof",
    "/.well-known/axid/log/consistency": "consistency",
}

# Each route's query parameters: (required, optional).
_PARAMS: Final[dict[LogRoute, tuple[str | None, str | None]]] = {
    "checkpoint": (None, None),
    "proof": ("seq", "size"),
    "consistency": ("old", "size"),
}
# Strict decimal: no sign, no leading zero, at most 19 digits (checked <= 2**63 - 1).
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,18}")
_MAX_INT: Final = 2**63 - 1
_MAX_QUERY: Final = 256

_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LogReadError(VerifierError):
    """A read route refuses: ``status``, a stable ``reason`` and a human ``detail``."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


def _bad(detail: str) -> LogReadError:
    return LogReadError(400, "bad_request", detail)


def parse_query(route: LogRoute, query: bytes) -> tuple[int | None, int | None]:
    """(the route's first parameter, ``size``) from a raw query string, strictly."""
    required, optional = _PARAMS[route]
    if len(query) > _MAX_QUERY:
        raise _bad("the query string is too long")
    try:
        text = query.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("the query string is not ASCII") from None
    values: dict[str, int] = {}
    for part in text.split("&") if text else ():
        name, eq, value = part.partition("=")
        if not eq or name not in (required, optional):
            raise _bad(f"unexpected query parameter {name[:32]!r}")
        if name in values:
            raise _bad(f"{name} given more than once")
        if _DECIMAL.fullmatch(value) is None or int(value) > _MAX_INT:
            raise _bad(f"{name} must be a non-negative decimal integer")
        values[name] = int(value)
    if required is not None and required not in values:
        raise _bad(f"{required} is required")
    return (values.get(required) if required else None), values.get("size")


def _note_size(note: bytes) -> int:
    try:
        text = note.decode("utf-8")
        return Checkpoint.parse(text[: text.index("\n\n") + 1]).size
    except (UnicodeDecodeError, ValueError, NoteError):
        _log.error("the decision log's latest checkpoint is not a checkpoint note")
        raise LogReadError(
            503, "audit_unavailable", "the decision log holds a malformed checkpoint"
        ) from None


def _signed_at(store: LogStore, size: int | None) -> tuple[int, bytes]:
    """(size, signed note) of the checkpoint of ``size``, or of the latest one.

    The note carries the witnesses' cosignatures stored beside it (C2SP form), so
    that a caller can check a quorum from the public routes alone.
    """
    if size is None:
        latest = store.latest_checkpoint()
        if latest is None:
            raise LogReadError(404, "not_found", "the decision log has no checkpoint yet")
        size = _note_size(latest)
    note = store.cosigned_note(size)
    if note is None:
        raise LogReadError(404, "not_found", f"the decision log has no checkpoint of size {size}")
    return size, note


def _read_sync(store: LogStore, route: LogRoute, first: int | None, size: int | None) -> str:
    """The route's text (blocking database reads: run it on a worker thread)."""
    size, note = _signed_at(store, size)
    if route == "checkpoint":
        return note.decode("utf-8")
    assert first is not None
    if route == "proof":
        if first >= size:
            raise _bad(f"seq must be less than the checkpoint size {size}")
        proof, _ = store.inclusion_proof(first, size)
        return proof_text(first, proof, note)
    if first > size:
        raise _bad(f"old must be at most the checkpoint size {size}")
    return consistency_text(first, store.consistency_proof(first, size), note)


async def read_log(store: LogStore, route: LogRoute, query: bytes) -> str:
    """The text of one read route, or :class:`LogReadError`. Reads off the event loop."""
    first, size = parse_query(route, query)
    try:
        return await asyncio.to_thread(_read_sync, store, route, first, size)
    except NotFound as exc:  # a checkpoint the store cannot prove from (should not happen)
        raise LogReadError(404, "not_found", str(exc)) from None
    except SQLAlchemyError as exc:
        _log.warning("decision log read failed: %s", type(exc).__name__)
        raise LogReadError(503, "audit_unavailable", "the decision log is unavailable") from None


async def _read_or_fail(store: LogStore, route: LogRoute, query: bytes) -> str:
    """:func:`read_log`, with anything unexpected a 503 (logged), never a crash."""
    try:
        return await read_log(store, route, query)
    except LogReadError:
        raise
    except Exception:
        _log.exception("serving a decision-log read route failed")
        raise LogReadError(503, "audit_unavailable", "the decision log could not be read") from None


async def _answer(
    send: _Send, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(body)).encode("ascii")),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_log_route(
    scope: MutableMapping[str, Any], send: _Send, route: LogRoute, store: LogStore | None
) -> None:
    """Answer one read route of the verifier (``store`` None: the log is not open)."""
    extra = [(b"cache-control", b"no-store")]
    try:
        if scope.get("method") != "GET":
            extra.append((b"allow", b"GET"))
            raise LogReadError(405, "method_not_allowed", "only GET is served here")
        if store is None:
            raise LogReadError(503, "audit_unavailable", "the decision log is not open")
        text = await _read_or_fail(store, route, scope.get("query_string", b""))
    except LogReadError as exc:
        body = problem_json(exc.status, exc.reason, exc.detail)
        await _answer(send, exc.status, body, b"application/problem+json", extra)
        return
    extra[0] = (b"cache-control", b"no-cache")
    await _answer(send, 200, text.encode("utf-8"), b"text/plain; charset=utf-8", extra)
