"""A second governed "payments" process for the replay test: same verifier YAML, same
database, its own uvicorn over mTLS. Prints ``PORT <n>`` once serving; exits on
SIGTERM or when stdin closes.

    python tests/_verifier_worker.py CONFIG.yaml CERT KEY BUNDLE CLOCK_OFFSET
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from mtls.sources import FileSource
from mtls.uvicorn import uvicorn_config
from verifier.config import VerifierConfig
from verifier.middleware import AxidVerifier


def build(config_path: str, offset: float) -> AxidVerifier:
    app = FastAPI()

    @app.get("/payments/{pid}")
    async def read(pid: str, request: Request) -> dict[str, Any]:
        return {"pid": pid, "process": "second", "run": request.state.axid.run}

    @app.post("/payments/{pid}/refund")
    async def refund(pid: str, request: Request) -> dict[str, Any]:
        return {"pid": pid, "process": "second", "refunded": True}

    config = VerifierConfig.from_file(config_path)
    return AxidVerifier(app, config, clock=lambda: time.time() + offset)


async def main() -> None:
    config_path, cert, key, bundle, offset = sys.argv[1:6]
    verifier = build(config_path, float(offset))
    source = FileSource(cert, key, bundle)
    server = uvicorn.Server(
        uvicorn_config(verifier, source=source, port=0, log_level="warning", lifespan="on")
    )

    # uvicorn handles SIGTERM/SIGINT itself.
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
