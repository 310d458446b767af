"""Step 7 of the pipeline: custom checks, and the seed example, a budget ledger.

A custom check is any async callable registered in ``VerifierConfig(checks=[...])``::

    async def check(action: VerifiedAction, request: RequestInfo) -> CheckResult

It runs only for requests that passed steps 1-6, in registration order; the first
``CheckResult(allow=False, ...)`` denies the request (403 ``custom_check_denied``).
Each check's note goes into the decision and its log entry, on allow and deny.
A check that raises, times out (``check_timeout``) or returns anything but a
:class:`CheckResult` denies too: fail closed. A check is named in notes by its
``name`` attribute, else its ``__name__``, else its type's name.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from verifier.decision import VerifiedAction

__all__ = [
    "BudgetLedger",
    "CheckResult",
    "CustomCheck",
    "RequestInfo",
    "check_name",
]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A custom check's verdict and a short note for the decision log."""

    allow: bool
    note: str = ""

    def __post_init__(self) -> None:
        if type(self.allow) is not bool:
            raise TypeError("CheckResult.allow must be a bool")
        if not isinstance(self.note, str):
            raise TypeError("CheckResult.note must be a str")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a custom check may look at. ``headers`` exclude the token header.

    ``client`` is the socket peer when the server records it (mtls.uvicorn's
    ``axid.transport`` extension), else the ASGI scope's ``client``, which uvicorn's
    proxy headers may have rewritten from ``X-Forwarded-For``.
    """

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    client: tuple[str, int] | None

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


Cost = Callable[[VerifiedAction, RequestInfo], float]


class BudgetLedger:
    """Denies an action once its run tree has spent more than ``limit``.

    A run tree is everything spawned under one root run (``action.root_run``), per
    tenant. Each allowed action is charged ``cost`` (a number, or a function of the
    action and request) before it runs; the app may add real costs afterwards with
    :meth:`charge`. An action whose charge would take its tree past ``limit`` is
    denied and not charged. In memory, per process: the seed example of a custom
    check, not a shared ledger (a real one keeps its totals in a database).
    """

    name = "budget"

    def __init__(self, limit: float, *, cost: float | Cost = 1.0) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0:
            raise ValueError("limit must be a non-negative number")
        if not math.isfinite(limit):
            raise ValueError("limit must be finite")
        self._limit = float(limit)
        self._cost = cost
        self._spent: dict[tuple[str, str], float] = {}
        self._lock = asyncio.Lock()

    @property
    def limit(self) -> float:
        return self._limit

    def spent(self, tenant: str, root_run: str) -> float:
        return self._spent.get((tenant, root_run), 0.0)

    def _cost_of(self, action: VerifiedAction, request: RequestInfo) -> float:
        cost = self._cost(action, request) if callable(self._cost) else self._cost
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost):
            raise ValueError("a cost must be a finite number")
        if cost < 0:
            raise ValueError("a cost must not be negative")
        return float(cost)

    async def charge(self, action: VerifiedAction, amount: float) -> float:
        """Add ``amount`` to the action's run tree; returns the new total."""
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise TypeError("amount must be a number")
        if not math.isfinite(amount) or amount < 0:
            raise ValueError("amount must be a finite non-negative number")
        key = (action.tenant, action.root_run)
        async with self._lock:
            total = self._spent.get(key, 0.0) + float(amount)
            self._spent[key] = total
        return total

    async def __call__(self, action: VerifiedAction, request: RequestInfo) -> CheckResult:
        cost = self._cost_of(action, request)
        key = (action.tenant, action.root_run)
        async with self._lock:
            spent = self._spent.get(key, 0.0)
            if spent + cost > self._limit:
                return CheckResult(
                    False,
                    f"run tree {action.root_run} spent {spent:g} of {self._limit:g}; "
                    f"this action costs {cost:g}",
                )
            self._spent[key] = spent + cost
        return CheckResult(
            True, f"run tree {action.root_run} spent {spent + cost:g} of {self._limit:g}"
        )
