"""Subprocess appender for the multi-process and crash tests (run with sys.executable).

python _audit_storage_worker.py bulk URL LOG KEY TAG COUNT CONCURRENCY
    prints "ready", waits for a line on stdin, appends COUNT entries with
    CONCURRENCY concurrent callers (note = TAG-i), prints "done COUNT".
python _audit_storage_worker.py loop URL LOG KEY TAG CONCURRENCY
    appends until killed; prints "SEQ LEAFHEX" (flushed) after each receipt.
"""

from __future__ import annotations

import asyncio
import sys

from axid.audit.log import DecisionLog


def _fields(tag: str, i: int) -> dict[str, object]:
    return {
        "decision": "allow",
        "reason": "ok",
        "service": "payments",
        "path": f"/payments/{i}",
        "tenant": "acme",
        "agent": tag,
        "note": f"{tag}-{i}",
    }


async def _bulk(url: str, log: str, key: str, tag: str, count: int, conc: int) -> None:
    async with await DecisionLog.open(url, log=log, key=key) as dl:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        nxt = iter(range(count))

        async def caller() -> None:
            for i in nxt:
                await dl.append(_fields(tag, i))

        await asyncio.gather(*(caller() for _ in range(conc)))
    print(f"done {count}", flush=True)


async def _loop(url: str, log: str, key: str, tag: str, conc: int) -> None:
    async with await DecisionLog.open(url, log=log, key=key) as dl:
        counter = iter(range(1 << 62))
        out = sys.stdout

        async def caller() -> None:
            for i in counter:
                r = await dl.append(_fields(tag, i))
                out.write(f"{r.seq} {r.leaf_hash.hex()}\n")
                out.flush()

        await asyncio.gather(*(caller() for _ in range(conc)))


def main(argv: list[str]) -> None:
    mode, url, log, key, tag = argv[:5]
    if mode == "bulk":
        asyncio.run(_bulk(url, log, key, tag, int(argv[5]), int(argv[6])))
    elif mode == "loop":
        asyncio.run(_loop(url, log, key, tag, int(argv[5])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
