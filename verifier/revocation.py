"""Step 6 of the pipeline: is the action revoked?

A token is revoked if its ``jti``, its ``run``, any run in its ``chain`` (so
revoking a run revokes every run spawned under it, even ones spawned later), its
``agent`` or its ``tenant`` is in the revocation set. Agent and tenant values
are slugs, run ids are global: the same matching the issuer applies.

Sources (one interface: ``current()``, ``start()``, ``close()``, ``seq``):

* :class:`IssuerRevocationPoller` polls the issuer's ``GET /v1/revocations?since=N``
  over mTLS, incrementally (``since`` = the last seq seen), every ``interval``.
* :class:`DatabaseRevocationSource` reads the issuer's revocation table
  (``axid_issuer_revocation``: seq, kind, value) from a shared database, also
  incrementally. The table is described here, not imported: the verifier never
  imports the issuer service.
* :class:`StaticRevocations` is a set filled in code (tests, embedders).

Fail closed: if the last successful poll is older than ``max_stale`` (or there
has been none), ``current()`` is ``None`` and the pipeline denies with 503
``revocation_unavailable``: "not revoked" cannot be established from stale data.
A poll is successful only once it has caught up with the feed (its last page was
short): a poll that stops after ``max_pages`` full pages applies what it read but
does not refresh the set's freshness, and the background loop polls again at once.

jti revocations are kept for the life of the process: the feed does not say when
the revoked token expires, so none is pruned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import httpx
from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, select
from sqlalchemy.exc import SQLAlchemyError

from axid.audit.store import make_engine
from axid.tokens import ActionClaims
from verifier._poller import Poller, get_capped
from verifier.errors import VerifierError

__all__ = [
    "REVOCATION_KINDS",
    "DatabaseRevocationSource",
    "IssuerRevocationPoller",
    "RevocationError",
    "RevocationHit",
    "RevocationSet",
    "RevocationSource",
    "StaticRevocations",
]

_log = logging.getLogger(__name__)

REVOCATION_KINDS: Final = ("jti", "run", "agent", "tenant")
_PAGE: Final = 1000
_MAX_PAGES_PER_POLL: Final = 100
_MAX_BODY: Final = 4 * 1024 * 1024
_MAX_VALUE: Final = 256
_MAX_SEQ: Final = 2**53 - 1

# The issuer's table, as far as a reader needs it (own MetaData: no clash with the
# issuer's SQLModel table when both live in one process).
_METADATA: Final = MetaData()
_REVOCATION_T: Final = Table(
    "axid_issuer_revocation",
    _METADATA,
    Column("seq", BigInteger, primary_key=True),
    Column("kind", String(16)),
    Column("value", String(256)),
)


class RevocationError(VerifierError):
    """A revocation feed answered something that is not a valid page."""


@dataclass(frozen=True, slots=True)
class RevocationHit:
    """Why an action is revoked: what matched."""

    kind: str
    value: str
    ancestor: bool = False  # a run of the token's chain, not its own run

    def describe(self) -> str:
        what = "ancestor run" if self.ancestor else self.kind
        return f"{what} {self.value} is revoked"


class RevocationSet:
    """Revoked jtis, runs, agents and tenants; ``seq`` is the last feed seq applied."""

    __slots__ = ("_by_kind", "seq")

    def __init__(self) -> None:
        self._by_kind: dict[str, set[str]] = {kind: set() for kind in REVOCATION_KINDS}
        self.seq = 0

    def add(self, kind: str, value: str) -> None:
        if kind not in self._by_kind:
            raise ValueError(f"unknown revocation kind {kind!r}")
        self._by_kind[kind].add(value)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        kind, value = item
        return value in self._by_kind.get(kind, ())

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_kind.values())

    def match(self, claims: ActionClaims) -> RevocationHit | None:
        """The broadest revocation that covers ``claims``, or ``None``."""
        by = self._by_kind
        if claims.tenant in by["tenant"]:
            return RevocationHit("tenant", claims.tenant)
        if claims.agent in by["agent"]:
            return RevocationHit("agent", claims.agent)
        runs = by["run"]
        for run in claims.chain:  # root first: name the highest revoked ancestor
            if run in runs:
                return RevocationHit("run", run, ancestor=True)
        if claims.run in runs:
            return RevocationHit("run", claims.run)
        if claims.jti in by["jti"]:
            return RevocationHit("jti", claims.jti)
        return None


@runtime_checkable
class RevocationSource(Protocol):
    def current(self) -> RevocationSet | None:
        """The revocation set if fresh enough to rely on, else ``None``."""
        ...

    @property
    def seq(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticRevocations:
    """Revocations given in code; always fresh."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._set = RevocationSet()
        for kind, value in items:
            self.revoke(kind, value)

    def revoke(self, kind: str, value: str) -> None:
        self._set.add(kind, value)
        self._set.seq += 1

    def current(self) -> RevocationSet:
        return self._set

    @property
    def seq(self) -> int:
        return self._set.seq

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _check_row(item: object, after: int) -> tuple[int, str, str]:
    """One revocation of a feed page: ``{seq, kind, value, ...}`` with seq > after."""
    if not isinstance(item, dict):
        raise RevocationError("a revocation is not an object")
    seq, kind, value = item.get("seq"), item.get("kind"), item.get("value")
    if isinstance(seq, bool) or not isinstance(seq, int) or not after < seq <= _MAX_SEQ:
        raise RevocationError("revocation seq is not an increasing integer")
    if kind not in REVOCATION_KINDS:
        raise RevocationError("revocation kind is unknown")
    if not isinstance(value, str) or not value or len(value) > _MAX_VALUE:
        raise RevocationError("revocation value is not a non-empty string")
    return seq, kind, value


class _Poller:
    """Shared polling loop: ``_poll_once`` fetches and applies everything after ``seq``."""

    def __init__(
        self,
        *,
        interval: float,
        max_stale: float,
        name: str,
        monotonic: Callable[[], float] = time.monotonic,
        page_size: int = _PAGE,
        max_pages: int = _MAX_PAGES_PER_POLL,
    ) -> None:
        if type(page_size) is not int or not 1 <= page_size <= _PAGE:
            raise ValueError(f"page_size must be an int in [1, {_PAGE}]")
        if type(max_pages) is not int or max_pages < 1:
            raise ValueError("max_pages must be a positive int")
        self._page_size = page_size
        self._max_pages = max_pages
        self._behind = False  # the last poll stopped before the end of the feed
        self._set = RevocationSet()
        self._interval = interval
        self._max_stale = max_stale
        self._name = name
        self._monotonic = monotonic
        self._fresh_at = -float("inf")
        self._poller = Poller(
            self.poll,
            self._next_delay,
            name="axid-revocations",
            log=_log,
            crash_message="revocation poller failed",
            on_crash=self._crashed,
        )
        self._lock = asyncio.Lock()
        self.polls = 0
        self.last_error: str | None = None

    @property
    def seq(self) -> int:
        return self._set.seq

    @property
    def age(self) -> float:
        """Seconds since the last successful poll (inf before the first)."""
        return self._monotonic() - self._fresh_at

    def current(self) -> RevocationSet | None:
        if self._monotonic() - self._fresh_at > self._max_stale:
            return None
        return self._set

    def _apply(self, rows: list[tuple[int, str, str]]) -> None:
        for seq, kind, value in rows:
            self._set.add(kind, value)
            self._set.seq = seq

    async def _page_rows(self, since: int) -> list[tuple[int, str, str]]:
        """Up to ``page_size`` revocations after ``since``, checked, oldest first."""
        raise NotImplementedError

    async def _poll_once(self) -> bool:
        """Apply pages until one is short (caught up: True) or ``max_pages`` (False)."""
        for _ in range(self._max_pages):
            rows = await self._page_rows(self._set.seq)
            self._apply(rows)
            if len(rows) < self._page_size:
                return True
        return False

    async def poll(self) -> bool:
        """Poll now; True on success (the set is then fresh: caught up with the feed)."""
        async with self._lock:
            started = self._monotonic()
            self.polls += 1
            try:
                caught_up = await self._poll_once()
            except (RevocationError, httpx.HTTPError, SQLAlchemyError, OSError) as exc:
                self._behind = False
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                _log.warning("revocations from %s: poll failed: %s", self._name, self.last_error)
                return False
            self._behind = not caught_up
            if not caught_up:
                # More is waiting: what was read is applied, but the set is not complete
                # as of any moment, so its freshness stays as it was.
                self.last_error = f"behind: {self._max_pages} full pages read, more remain"
                _log.warning(
                    "revocations from %s: still behind after %d pages (seq %d)",
                    self._name,
                    self._max_pages,
                    self._set.seq,
                )
                return False
            # Fresh as of when the poll began: anything revoked later is not in it.
            self._fresh_at = started
            self.last_error = None
            return True

    def _next_delay(self) -> float:
        # Behind the feed: go on at once (yielding to the loop), else wait.
        return 0 if self._behind else self._interval

    def _crashed(self) -> None:
        self._behind = False

    async def start(self) -> None:
        """First poll (a failure is logged, not raised), then poll in the background."""
        await self.poll()
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()


class IssuerRevocationPoller(_Poller):
    """Polls ``GET <url>?since=N&limit=1000`` (the issuer's ``/v1/revocations``) with
    the caller's mTLS ``httpx.AsyncClient`` (not closed here). ``page_size`` (the
    ``limit``, at most 1000) and ``max_pages`` bound one poll (see the module doc)."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        interval: float = 5.0,
        max_stale: float = 60.0,
        timeout: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        page_size: int = _PAGE,
        max_pages: int = _MAX_PAGES_PER_POLL,
    ) -> None:
        super().__init__(
            interval=interval,
            max_stale=max_stale,
            name=url,
            monotonic=monotonic,
            page_size=page_size,
            max_pages=max_pages,
        )
        self._url = url
        self._client = client
        self._timeout = timeout

    async def _page_rows(self, since: int) -> list[tuple[int, str, str]]:
        params = {"since": since, "limit": self._page_size}
        body = await get_capped(
            self._client,
            self._url,
            params=params,
            timeout=self._timeout,
            max_bytes=_MAX_BODY,
            error=RevocationError,
            too_large="revocation page too large",
        )
        try:
            doc: Any = json.loads(body)
        except ValueError:
            raise RevocationError("revocation page is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("revocations"), list):
            raise RevocationError('revocation page lacks a "revocations" array')
        rows: list[tuple[int, str, str]] = []
        after = since
        for item in doc["revocations"]:
            row = _check_row(item, after)
            rows.append(row)
            after = row[0]
        if len(rows) > self._page_size:
            raise RevocationError("revocation page is longer than the limit asked for")
        nxt = doc.get("next")
        if isinstance(nxt, bool) or not isinstance(nxt, int) or nxt != after:
            raise RevocationError('"next" is not the last seq of the page')
        return rows


class DatabaseRevocationSource(_Poller):
    """Reads the issuer's revocation table from a shared database (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        interval: float = 5.0,
        max_stale: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        page_size: int = _PAGE,
        max_pages: int = _MAX_PAGES_PER_POLL,
    ) -> None:
        super().__init__(
            interval=interval,
            max_stale=max_stale,
            name="database",
            monotonic=monotonic,
            page_size=page_size,
            max_pages=max_pages,
        )
        self._url = url
        self._engine: Engine | None = None

    def _read(self, since: int) -> list[tuple[int, str, str]]:
        assert self._engine is not None
        t = _REVOCATION_T
        with self._engine.connect() as conn:
            result = conn.execute(
                select(t.c.seq, t.c.kind, t.c.value)
                .where(t.c.seq > since)
                .order_by(t.c.seq)
                .limit(self._page_size)
            ).all()
        rows = []
        after = since
        for r in result:
            row = _check_row({"seq": int(r.seq), "kind": r.kind, "value": r.value}, after)
            rows.append(row)
            after = row[0]
        return rows

    async def _page_rows(self, since: int) -> list[tuple[int, str, str]]:
        if self._engine is None:
            self._engine = await asyncio.to_thread(make_engine, self._url)
        return await asyncio.to_thread(self._read, since)

    async def close(self) -> None:
        await super().close()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.dispose)
