"""HTTP plumbing shared by the issuer's routes: JSON bodies, strict query integers,
receipt headers, and the exception handlers that make every error problem+json."""

from __future__ import annotations

import re
from typing import Any, Final

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from axid.audit.receipt import RECEIPT_HEADER, Receipt
from axid.issuer.problems import Refusal, problem_response
from axid.issuer.schemas import MAX_BODY_BYTES, parse_json_body

__all__ = ["install_error_handlers", "query_int", "read_json", "receipt_headers"]

# Up to 16 digits: enough for 2**53 - 1 (the largest `since`); query_int checks the range.
_UINT_RE: Final = re.compile(r"[0-9]{1,16}")
_JSON_TYPE_RE: Final = re.compile(r"application/json", re.IGNORECASE)


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body: ``application/json``, at most MAX_BODY_BYTES."""
    ctype = request.headers.get("content-type", "")
    if _JSON_TYPE_RE.fullmatch(ctype.split(";", 1)[0].strip()) is None:
        raise Refusal(415, "bad_request", "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise Refusal(413, "bad_request", f"request body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise Refusal(413, "bad_request", f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return parse_json_body(b"".join(chunks))


def query_int(request: Request, name: str, default: int, hi: int, *, lo: int = 0) -> int:
    """Query parameter ``name``: absent -> ``default``; else once, decimal, in [lo, hi]."""
    values = request.query_params.getlist(name)
    if not values:
        return default
    if len(values) > 1 or _UINT_RE.fullmatch(values[0]) is None:
        raise Refusal(400, "bad_request", f"{name} must be one non-negative integer")
    value = int(values[0])
    if not lo <= value <= hi:
        raise Refusal(400, "bad_request", f"{name} must be in [{lo}, {hi}]")
    return value


def receipt_headers(receipt: Receipt, headers: dict[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus the ``AXID-Receipt`` of the decision the answer reports."""
    return {**(headers or {}), RECEIPT_HEADER: receipt.header_value()}


async def _on_refusal(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refusal)
    return problem_response(exc.status, exc.reason, exc.detail)


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    reason = {404: "not_found", 405: "method_not_allowed"}.get(
        status, "internal_error" if status >= 500 else "bad_request"
    )
    detail = {404: "no such route", 405: "method not allowed for this route"}.get(
        status, "request refused"
    )
    headers = dict(exc.headers or {}) if status == 405 else None
    return problem_response(status, reason, detail, headers=headers)


async def _on_validation_error(_request: Request, exc: Exception) -> Response:
    return problem_response(400, "bad_request", "the request is malformed")


async def _on_crash(_request: Request, exc: Exception) -> Response:
    # Starlette logs the exception after this; the client gets no internals.
    return problem_response(500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers is problem+json (RFC 9457) with a ``reason``."""
    app.add_exception_handler(Refusal, _on_refusal)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_crash)
