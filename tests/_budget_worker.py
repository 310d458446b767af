"""One governed "payments" replica with a shared BudgetLedger, for tests/test_budget.py.

Its own uvicorn over mTLS (the dev PKI's payments SVID); the decision log and the
budget table are in the databases the JSON settings name, shared with the other
replica. Prints ``PORT <n>`` once serving; exits on SIGTERM or when stdin closes.

    python tests/_budget_worker.py SETTINGS.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from axid.keys import KeySet
from mtls.sources import FileSource
from mtls.uvicorn import uvicorn_config
from verifier import BudgetLedger, IdentityConfig, LogConfig, RouteRule, VerifierConfig
from verifier.middleware import AxidVerifier
from verifier.revocation import StaticRevocations


def build(settings: dict[str, Any]) -> AxidVerifier:
    app = FastAPI()

    @app.get("/spend/{rid}")
    async def spend(rid: str, request: Request) -> dict[str, Any]:
        return {"rid": rid, "replica": settings["replica"], "run": request.state.axid.run}

    ledger = BudgetLedger(
        settings["budget_url"],
        per_tree=settings["per_tree"],
        per_tenant_daily=settings["per_tenant_daily"],
        lock_timeout=30.0,  # 64 requests queue on one row: wait, do not fail
    )
    config = VerifierConfig(
        service="payments",
        issuer=settings["issuer"],
        tenants=["acme"],
        identity=IdentityConfig(bundle=settings["bundle"]),
        jwks=KeySet.from_jwks(Path(settings["jwks"]).read_text()),
        revocations=StaticRevocations(),
        log=LogConfig(
            url=settings["log_url"],
            key=settings["log_key"],
            name=settings["log_name"],
            lock_timeout=30.0,
        ),
        rules=[RouteRule("/spend/*", methods=["GET"], scope="payments:read", cost=7)],
        checks=[ledger],
        check_timeout=60.0,
    )
    return AxidVerifier(app, config)


async def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    verifier = build(settings)
    source = FileSource(settings["cert"], settings["key"], settings["bundle"])
    server = uvicorn.Server(
        uvicorn_config(verifier, source=source, port=0, log_level="warning", lifespan="on")
    )

    def watch_stdin() -> None:  # the parent went away: stop
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
    await task
    source.close()


if __name__ == "__main__":
    asyncio.run(main())
