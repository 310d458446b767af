"""The background refresher of the verifier's remote sources (JWKS, revocations).

One asyncio task calls ``step`` after ``delay()`` seconds, again and again, until
:meth:`Poller.close` cancels it. The sources keep their own policy (when to call,
what counts as fresh, how long stale data may serve); this module only keeps the
loop alive: an unexpected exception in ``step`` is logged and reported to
``on_crash``, never allowed to end the task silently. Also here: the one capped
streaming GET both sources fetch with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

import httpx

__all__ = ["Poller", "get_capped"]


class Poller:
    """``step`` every ``delay()`` seconds in a task named ``name``; see the module doc."""

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        delay: Callable[[], float],
        *,
        name: str,
        log: logging.Logger,
        crash_message: str,
        on_crash: Callable[[], None],
    ) -> None:
        self._step = step
        self._delay = delay
        self._name = name
        self._log = log
        self._crash_message = crash_message
        self._on_crash = on_crash
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._delay())
            try:
                await self._step()
            except Exception:  # never let the refresher die silently
                self._log.exception(self._crash_message)
                self._on_crash()

    def start(self) -> None:
        """Start the task (in the running loop); the first ``step`` comes after ``delay()``."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def close(self) -> None:
        """Cancel the task and wait for it to end; a no-op if it is not running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def get_capped(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    error: Callable[[str], Exception],
    too_large: str,
    params: Mapping[str, int] | None = None,
) -> bytes:
    """The body of a 200 answer to ``GET url``, read no further than ``max_bytes``.

    Another status raises ``error("HTTP <status>")``; a larger body ``error(too_large)``.
    """
    async with client.stream("GET", url, params=params, timeout=timeout) as response:
        if response.status_code != 200:
            raise error(f"HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise error(too_large)
    return bytes(body)
