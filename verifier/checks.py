"""Step 7 of the pipeline: custom checks (a shared budget is :mod:`verifier.budget`).

A custom check is any async callable registered in ``VerifierConfig(checks=[...])``::

    async def check(action: VerifiedAction, request: RequestInfo) -> CheckResult

It runs only for requests that passed steps 1-6, in registration order; the first
``CheckResult(allow=False, ...)`` denies the request with its ``reason`` (403,
default ``custom_check_denied``). Each check's note goes into the decision and its
log entry, on allow and deny. A check that raises, times out (``check_timeout``) or
returns anything but a :class:`CheckResult` denies too: fail closed. A check is
named in notes by its ``name`` attribute, else its ``__name__``, else its type's name.

An allowing check that reserved something (a budget) gives an ``undo``: it is
awaited if the request is not allowed in the end (a later check or the single-use
claim denies, or the decision log cannot record the allow), so nothing stays
reserved for a request that never ran.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from verifier.decision import STATUS, VerifiedAction
from verifier.rules import RouteRule

__all__ = [
    "DEFAULT_REASON",
    "CheckResult",
    "CustomCheck",
    "RequestInfo",
    "check_name",
]


DEFAULT_REASON: Final = "custom_check_denied"

Undo = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A custom check's verdict and a short note for the decision log.

    ``reason`` names a deny: a verifier reason code answered 403 (default
    ``custom_check_denied``); an allow has none. ``undo`` (allow only) releases
    what the check reserved for this request; it should not raise.
    """

    allow: bool
    note: str = ""
    reason: str | None = None
    undo: Undo | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.allow) is not bool:
            raise TypeError("CheckResult.allow must be a bool")
        if not isinstance(self.note, str):
            raise TypeError("CheckResult.note must be a str")
        if self.reason is not None:
            if self.allow:
                raise ValueError("an allowing CheckResult has no reason")
            if not isinstance(self.reason, str) or STATUS.get(self.reason) != 403:
                raise ValueError(f"{self.reason!r} is not a verifier reason code answered 403")
        if self.undo is not None and (self.allow is False or not callable(self.undo)):
            raise ValueError("undo is a callable, given only with an allow")

    @property
    def deny_reason(self) -> str:
        """The reason code of this deny (``custom_check_denied`` unless named)."""
        return self.reason or DEFAULT_REASON


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a custom check may look at. ``headers`` exclude the token header.

    ``client`` is the socket peer when the server records it (mtls.uvicorn's
    ``axid.transport`` extension), else the ASGI scope's ``client``, which uvicorn's
    proxy headers may have rewritten from ``X-Forwarded-For``. ``rule`` is the
    route rule that matched (set by the pipeline before the checks run).
    """

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    client: tuple[str, int] | None
    rule: RouteRule | None = None

    def for_rule(self, rule: RouteRule) -> RequestInfo:
        """This request as matched by ``rule`` (without dataclasses.replace's cost)."""
        return RequestInfo(
            self.method, self.path, self.query_string, self.headers, self.client, rule
        )

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), latin-1 decoded."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None


@runtime_checkable
class CustomCheck(Protocol):
    def __call__(self, action: VerifiedAction, request: RequestInfo) -> Awaitable[CheckResult]: ...


def check_name(check: object) -> str:
    name = getattr(check, "name", None) or getattr(check, "__name__", None)
    return str(name) if name else type(check).__name__

