"""The demo's governed sample service, "payments" (audience ``payments``, tenant ``acme``).

::

    GET    /payments/{id}          scope payments:read
    POST   /payments/{id}/refund   scope payments:refund   (single use: one refund per token)
    DELETE /payments/{id}          scope payments:delete   (approval: required: a human
                                   approves exactly that request, once)
    GET    /healthz                ungoverned

Every route but ``/healthz`` sits behind :class:`verifier.middleware.AxidVerifier`: a
handler runs only after the verifier allowed the request and committed that decision
to the ``payments`` decision log, so each answer says who did it (``request.state.axid``:
SPIFFE ID, tenant, agent, run, spawn chain) and which log entry records it.

The payments themselves are a small in-memory table (a demo, not a ledger).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from axid.audit.witnessing import WitnessConfig as LogWitness
from verifier.config import (
    ApprovalsConfig,
    IdentityConfig,
    JwksConfig,
    LogConfig,
    VerifierConfig,
)
from verifier.decision import VerifiedAction
from verifier.middleware import AxidVerifier
from verifier.rules import RouteRule

__all__ = [
    "PAYMENTS_AUDIENCE",
    "PAYMENTS_RULES",
    "PAYMENTS_SERVICE",
    "PAYMENTS_TENANT",
    "SAMPLE_PAYMENTS",
    "create_payments_app",
    "payments_verifier_config",
]

PAYMENTS_SERVICE: Final = "payments"
PAYMENTS_AUDIENCE: Final = "payments"
PAYMENTS_TENANT: Final = "acme"

PAYMENTS_RULES: Final[tuple[RouteRule, ...]] = (
    RouteRule("/healthz", governed=False),
    RouteRule("/payments/*", methods=("GET",), scope="payments:read"),
    RouteRule("/payments/*/refund", methods=("POST",), scope="payments:refund", single_use=True),
    RouteRule("/payments/*", methods=("DELETE",), scope="payments:delete", approval="required"),
)

# id -> (amount in cents, currency)
SAMPLE_PAYMENTS: Final[dict[str, tuple[int, str]]] = {
    "p-1001": (12_500, "EUR"),
    "p-1002": (4_999, "EUR"),
    "p-1003": (250_000, "USD"),
}

_ID_RE: Final = re.compile(r"p-[0-9]{1,12}")


def payments_verifier_config(
    *,
    iss: str,
    issuer_url: str,
    bundle: Path,
    cert: Path,
    key: Path,
    database_url: str,
    log_key: Path,
    revocations: Any,
    issuer_id: str | None = None,
    leeway: int = 1,
    rules: Sequence[RouteRule] = PAYMENTS_RULES,
    witnesses: Sequence[LogWitness | Mapping[str, str]] = (),
    quorum: int | None = None,
    witness_mode: str = "async",
) -> VerifierConfig:
    """The demo's verifier configuration for "payments".

    The JWKS is fetched from the issuer over mTLS with the service's own SVID
    (``cert``/``key``); ``revocations`` is a revocation source object or a
    :class:`verifier.config.RevocationConfig`. The decision log ``payments`` (its
    key ``log_key``, created 0600 if missing) and the single-use store live in
    ``database_url``. ``witnesses`` (``{"url", "vkey"}`` each), ``quorum`` and
    ``witness_mode`` are the log's ``log.witnesses``, ``log.quorum`` and
    ``log.witness_mode``. Approval requests (the DELETE rule) are filed at the
    issuer's ``/v1/approvals``, over the same mTLS client.
    """
    return VerifierConfig(
        service=PAYMENTS_SERVICE,
        issuer=iss,
        audience=PAYMENTS_AUDIENCE,
        tenants=(PAYMENTS_TENANT,),
        leeway=leeway,
        identity=IdentityConfig(bundle=(bundle,), cert=cert, key=key),
        issuer_id=issuer_id,
        # A short cache: `axid keys rotate` during a hands-on session shows up soon.
        jwks=JwksConfig(
            url=f"{issuer_url}/.well-known/jwks.json", cache_ttl=60, refetch_min_interval=1
        ),
        revocations=revocations,
        log=LogConfig(
            url=database_url,
            key=log_key,
            name=PAYMENTS_SERVICE,
            create_key=True,
            witnesses=tuple(witnesses),
            quorum=quorum,
            witness_mode=witness_mode,
        ),
        approvals=ApprovalsConfig(url=f"{issuer_url}/v1/approvals"),
        rules=tuple(rules),
    )


class _Ledger:
    """The in-memory payments table (handlers of one app may run on several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {
            pid: {"id": pid, "amount": amount, "currency": currency, "status": "settled"}
            for pid, (amount, currency) in SAMPLE_PAYMENTS.items()
        }

    def get(self, pid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._rows.get(pid)
            return None if row is None else dict(row)

    def set_status(self, pid: str, status: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._rows.get(pid)
            if row is None:
                return None
            row["status"] = status
            return dict(row)

    def delete(self, pid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._rows.pop(pid, None)


def _by(request: Request) -> dict[str, Any]:
    """Who did it: the verified action the verifier put in ``request.state.axid``."""
    action: VerifiedAction = request.state.axid
    return {
        "spiffe_id": action.spiffe_id,
        "tenant": action.tenant,
        "agent": action.agent,
        "run": action.run,
        "spawn_parent": action.spawn_parent,
        "chain": list(action.chain),
        "scope": " ".join(sorted(action.scope)),
        "log_seq": action.log_seq,
    }


def _not_found(pid: str, request: Request) -> JSONResponse:
    # The request was allowed and recorded; the payment just does not exist.
    return JSONResponse({"error": "not_found", "payment": pid, "by": _by(request)}, status_code=404)


def create_payments_app(verifier_config: VerifierConfig) -> FastAPI:
    """The "payments" FastAPI app, every route but ``/healthz`` governed by
    :class:`~verifier.middleware.AxidVerifier` configured with ``verifier_config``
    (see :func:`payments_verifier_config` for the demo's)."""
    if not isinstance(verifier_config, VerifierConfig):
        raise TypeError("verifier_config must be a verifier.config.VerifierConfig")
    ledger = _Ledger()
    app = FastAPI(title="payments (AXID demo)", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(AxidVerifier, config=verifier_config)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/payments/{pid}")
    async def read_payment(pid: str, request: Request) -> Any:
        row = ledger.get(pid) if _ID_RE.fullmatch(pid) else None
        if row is None:
            return _not_found(pid, request)
        return {"payment": row, "by": _by(request)}

    @app.post("/payments/{pid}/refund")
    async def refund_payment(pid: str, request: Request) -> Any:
        row = ledger.set_status(pid, "refunded") if _ID_RE.fullmatch(pid) else None
        if row is None:
            return _not_found(pid, request)
        return {"payment": row, "refunded": True, "by": _by(request)}

    @app.delete("/payments/{pid}")
    async def delete_payment(pid: str, request: Request) -> Any:
        row = ledger.delete(pid) if _ID_RE.fullmatch(pid) else None
        if row is None:
            return _not_found(pid, request)
        return {"payment": row, "deleted": True, "by": _by(request)}

    return app
