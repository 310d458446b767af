"""The PostgreSQL test server, named by AXID_TEST_DATABASE_URL (DESIGN.md).

PostgreSQL variants skip only when the variable is unset, and never silently in CI:
`.ci/run` sets it, so an unset variable there is a broken CI set-up and fails.
"""

from __future__ import annotations

import os

import pytest

PG_ENV = "AXID_TEST_DATABASE_URL"
PG_URL: str | None = os.environ.get(PG_ENV) or None


def require_pg() -> str:
    """The PostgreSQL URL, or skip (fail under CI) with what to do about it."""
    if PG_URL is not None:
        return PG_URL
    if os.environ.get("CI"):
        pytest.fail(f"{PG_ENV} is unset under CI: .ci/run must set it to the local PostgreSQL")
    pytest.skip(
        f"PostgreSQL variant: set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to run it"
    )
