"""The one RFC 9457 problem document of AXID's answers (HTTP limits, verifier
denies, issuer refusals): ``type``, ``title``, ``status``, ``detail`` and the
``reason`` code, in that order; mtls is the bottom layer all of them import.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

__all__ = ["PROBLEM_MEDIA_TYPE", "problem_document"]

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"


def problem_document(status: int, reason: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The problem+json object of a ``status`` answer with ``reason`` (members in
    ``extra`` follow, e.g. an approval_required deny's ``approval``)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "reason": reason,
        **extra,
    }
