"""The PostgreSQL test server, named by AXID_TEST_DATABASE_URL (DESIGN.md).

PostgreSQL variants skip only when the variable is unset, and never silently in CI:
`.ci/run` sets it, so an unset variable there is a broken CI set-up and fails. The
same rule (:func:`unavailable`) holds for every other real peer a test needs.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

PG_ENV = "AXID_TEST_DATABASE_URL"
PG_URL: str | None = os.environ.get(PG_ENV) or None


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose real peer is missing here, with why; under CI, fail instead:
    CI's machine has every peer the suite needs, so a missing one is a broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(f"under CI: {reason}")
    pytest.skip(reason)


def require_pg() -> str:
    """The PostgreSQL URL, or skip (fail under CI) with what to do about it."""
    if PG_URL is not None:
        return PG_URL
    unavailable(
        f"PostgreSQL variant: set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to run it"
    )
