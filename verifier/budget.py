"""Budgets shared by every replica: :class:`BudgetLedger`, a custom check over one table.

::

    ledger = BudgetLedger("postgresql://...", per_tree=5_000, per_tenant_daily=100_000)
    config = VerifierConfig(..., rules=[RouteRule("/llm/*", scope="llm:call", cost=25)],
                            checks=[ledger])

An allowed request reserves its rule's ``cost`` (an integer, e.g. cents) against
two rows of the table ``axid_budget`` before the allow is recorded: its spawn
tree's (``chain[0]``, or ``run`` for a root; kind ``tree``) and its tenant's for
the current UTC day (kind ``tenant``). Both are reserved in one transaction, each
by a conditional ``UPDATE ... SET spent = spent + :cost WHERE spent + :cost <=
:limit``, so the database is the arbiter and no interleaving of requests,
processes or hosts can take a row past its limit: on SQLite the transaction
starts with ``BEGIN IMMEDIATE`` (writers take turns); on PostgreSQL the row lock
serialises the updates of one row and each re-checks the condition on the
committed value (READ COMMITTED). Rows are always locked tree first, then tenant,
so two reservations never wait on each other in a cycle. If either row has no
room, the transaction is rolled back and the request denied 403
``budget_exceeded`` (note ``spent/limit``).

Each row keeps the limit it was last reserved under (``NULL``: none), so ``axid
budget show`` prints spend against limits from the table alone. A cost of 0
touches nothing. A reservation is released (``CheckResult.undo``) if the request is
not allowed in the end (a later check denies, or the decision log cannot record
it). :meth:`BudgetLedger.settle` corrects an estimate afterwards with what was
really spent, which may take a row past its limit: later reservations are then
denied.

Fail closed: a database error (unreachable, locked past ``lock_timeout``, a
missing table) denies the request (403 ``custom_check_denied``, note naming the
error); nothing is allowed without its reservation committed. Blocking database
calls run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    MetaData,
    String,
    Table,
    and_,
    case,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateTable

from axid.audit.store import make_engine
from verifier.checks import CheckResult, RequestInfo, Undo
from verifier.decision import VerifiedAction
from verifier.rules import MAX_COST

__all__ = ["MAX_LIMIT", "BudgetLedger", "BudgetRow", "read_budgets"]

_log = logging.getLogger(__name__)

MAX_LIMIT: Final = 10**15
_MAX_NAME: Final = 512
_PG_SCHEMA_LOCK: Final = 0x41584944_42554447  # "AXIDBUDG"
# make_engine's execution option for BEGIN IMMEDIATE on SQLite (axid.audit.store).
_SQLITE_IMMEDIATE: Final = "axid_sqlite_immediate"

_METADATA: Final = MetaData()
BUDGET_TABLE: Final = Table(
    "axid_budget",
    _METADATA,
    Column("kind", String(8), primary_key=True),  # "tree" or "tenant"
    Column("name", String(_MAX_NAME), primary_key=True),  # root run, or tenant
    Column("day", String(10), primary_key=True),  # "" for a tree, else the UTC day
    Column("spent", BigInteger, nullable=False),
    Column("spend_limit", BigInteger, nullable=True),  # NULL: no limit
    Column("updated_at", BigInteger, nullable=False),
)
_T: Final = BUDGET_TABLE


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """One row of the table: what a tree (or a tenant on a day) spent, and its limit."""

    kind: str
    name: str
    day: str
    spent: int
    limit: int | None
    updated_at: int

    @property
    def left(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent

    def label(self) -> str:
        return f"tree {self.name}" if self.kind == "tree" else f"tenant {self.name} on {self.day}"


# (kind, name, day, limit): one row a reservation touches.
_Span = tuple[str, str, str, int | None]


class _Over(Exception):
    """Raised inside a reservation's transaction to roll it back."""

    def __init__(self, row: BudgetRow) -> None:
        super().__init__(row.label())
        self.row = row


def _name(value: object, what: str) -> str:
    if type(value) is not str or not value or not value.isprintable() or len(value) > _MAX_NAME:
        raise ValueError(f"{what} must be a non-empty printable string of at most {_MAX_NAME}")
    return value


def _limit(value: object, what: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_LIMIT:
        raise ValueError(f"{what} must be None or an integer in [0, {MAX_LIMIT}]")
    return value


class _Store:
    """The table's SQL, synchronous: called from worker threads."""

    def __init__(self, url: str, lock_timeout: float) -> None:
        self._engine = make_engine(url, lock_timeout=lock_timeout)
        self._pg = self._engine.dialect.name == "postgresql"
        self._ready = False
        self._ready_lock = threading.Lock()

    def close(self) -> None:
        self._engine.dispose()

    @property
    def sqlite_file(self) -> str | None:
        return None if self._pg else self._engine.url.database

    def _create_schema(self) -> None:
        """Once per process (CREATE TABLE IF NOT EXISTS, safe from several at once).
        A table dropped later is not recreated: its requests fail, closed."""
        with self._ready_lock:
            if self._ready:
                return
            with self._engine.begin() as conn:
                if self._pg:
                    conn.execute(select(func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
                conn.execute(CreateTable(_T, if_not_exists=True))
            self._ready = True

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: BEGIN IMMEDIATE on SQLite; committed on success."""
        self._create_schema()
        with self._engine.connect() as conn:
            if not self._pg:
                conn = conn.execution_options(**{_SQLITE_IMMEDIATE: True})
            with conn.begin():
                yield conn

    def _ensure_row(self, conn: Connection, span: _Span, now: int) -> None:
        kind, name, day, limit = span
        insert = pg_insert if self._pg else sqlite_insert
        conn.execute(
            insert(_T)
            .values(kind=kind, name=name, day=day, spent=0, spend_limit=limit, updated_at=now)
            .on_conflict_do_nothing(index_elements=["kind", "name", "day"])
        )

    @staticmethod
    def _where(span: _Span) -> list[object]:
        kind, name, day, _ = span
        return [_T.c.kind == kind, _T.c.name == name, _T.c.day == day]

    def reserve(self, spans: Sequence[_Span], cost: int, now: int) -> BudgetRow | list[BudgetRow]:
        """Reserve ``cost`` on every span, or on none: the rows after, or the full one."""
        rows: list[BudgetRow] = []
        try:
            with self._write() as conn:
                for span in spans:
                    self._ensure_row(conn, span, now)
                    limit = span[3]
                    room = [] if limit is None else [_T.c.spent + cost <= limit]
                    spent = conn.execute(
                        update(_T)
                        .where(*self._where(span), *room)
                        .values(spent=_T.c.spent + cost, spend_limit=limit, updated_at=now)
                        .returning(_T.c.spent)
                    ).scalar_one_or_none()
                    if spent is None:
                        held = conn.execute(
                            select(_T.c.spent).where(*self._where(span))
                        ).scalar_one()
                        raise _Over(BudgetRow(*span[:3], int(held), limit, now))
                    rows.append(BudgetRow(*span[:3], int(spent), limit, now))
        except _Over as over:  # rolled back: nothing reserved
            return over.row
        return rows

    def release(self, spans: Sequence[_Span], cost: int, now: int) -> None:
        """Give back a reservation of ``cost`` (never below zero)."""
        with self._write() as conn:
            for span in spans:
                conn.execute(
                    update(_T)
                    .where(*self._where(span))
                    .values(
                        spent=case((_T.c.spent >= cost, _T.c.spent - cost), else_=0),
                        updated_at=now,
                    )
                )

    def settle(self, spans: Sequence[_Span], delta: int, now: int) -> list[BudgetRow]:
        """Add ``delta`` (may be negative, never below zero) to every span, or to none."""
        rows: list[BudgetRow] = []
        with self._write() as conn:
            for span in spans:
                self._ensure_row(conn, span, now)
                spent = conn.execute(
                    update(_T)
                    .where(*self._where(span), _T.c.spent + delta >= 0)
                    .values(spent=_T.c.spent + delta, updated_at=now)
                    .returning(_T.c.spent, _T.c.spend_limit)
                ).one_or_none()
                if spent is None:  # raising rolls the whole settle back
                    raise ValueError(f"settling {delta} would take {span[0]} {span[1]} below 0")
                rows.append(BudgetRow(*span[:3], int(spent[0]), spent[1], now))
        return rows

    def read(self, tree: str | None, tenant: str | None) -> list[BudgetRow]:
        with self._engine.connect() as conn:
            if not inspect(conn).has_table(_T.name):
                return []
            query = select(_T).order_by(_T.c.kind.desc(), _T.c.name, _T.c.day)
            wanted = []
            if tree is not None:
                wanted.append(and_(_T.c.kind == "tree", _T.c.name == tree))
            if tenant is not None:
                wanted.append(and_(_T.c.kind == "tenant", _T.c.name == tenant))
            if wanted:
                query = query.where(or_(*wanted))
            return [
                BudgetRow(r.kind, r.name, r.day, int(r.spent), r.spend_limit, int(r.updated_at))
                for r in conn.execute(query)
            ]


def read_budgets(
    database_url: str, *, tree: str | None = None, tenant: str | None = None
) -> list[BudgetRow]:
    """The table's rows (none if it does not exist), optionally only one tree's and/or
    one tenant's (every day). Synchronous; raises on a database error, and
    FileNotFoundError for a SQLite file that does not exist (rather than create it)."""
    store = _Store(database_url, 5.0)  # refuses a malformed URL
    sqlite_file = store.sqlite_file
    if sqlite_file is not None and not Path(sqlite_file).is_file():
        store.close()
        raise FileNotFoundError(f"no SQLite database at {sqlite_file}")
    try:
        return store.read(
            None if tree is None else _name(tree, "tree"),
            None if tenant is None else _name(tenant, "tenant"),
        )
    finally:
        store.close()


def _fraction(row: BudgetRow) -> str:
    return f"{row.spent}/{'-' if row.limit is None else row.limit}"


class BudgetLedger:
    """A custom check reserving each request's rule ``cost`` against shared limits.

    ``per_tree`` bounds what one spawn tree spends in all; ``per_tenant_daily``
    what one tenant spends per UTC day. Either may be ``None`` (spend is still
    recorded), not both. ``database_url`` is a SQLite file or PostgreSQL URL shared
    by every replica. ``clock`` (Unix seconds) picks the day; ``lock_timeout``
    bounds waiting for a row (then the request is denied). See the module doc.
    """

    name = "budget"

    def __init__(
        self,
        database_url: str,
        *,
        per_tree: int | None = None,
        per_tenant_daily: int | None = None,
        lock_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._per_tree = _limit(per_tree, "per_tree")
        self._per_tenant = _limit(per_tenant_daily, "per_tenant_daily")
        if self._per_tree is None and self._per_tenant is None:
            raise ValueError("give per_tree, per_tenant_daily or both")
        if not callable(clock):
            raise TypeError("clock must be a callable returning Unix seconds")
        self._clock = clock
        self._store = _Store(database_url, lock_timeout)
        self._pending: set[asyncio.Task[object]] = set()

    @property
    def per_tree(self) -> int | None:
        return self._per_tree

    @property
    def per_tenant_daily(self) -> int | None:
        return self._per_tenant

    def close(self) -> None:
        """Close the database connections (the ledger opens them again if used)."""
        self._store.close()

    def _spans(self, tree: str, tenant: str) -> tuple[list[_Span], int]:
        now = self._clock()
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        spans = [("tree", tree, "", self._per_tree), ("tenant", tenant, day, self._per_tenant)]
        return spans, int(now)

    async def __call__(self, action: VerifiedAction, request: RequestInfo) -> CheckResult:
        if request.rule is None:  # the pipeline always sets it: the cost is unknown
            return CheckResult(False, "no route rule, so no cost to reserve")
        cost = request.rule.cost
        if cost == 0:
            return CheckResult(True)
        spans, now = self._spans(_name(action.root_run, "tree"), _name(action.tenant, "tenant"))
        try:
            outcome = await self._reserve(spans, cost, now)
        except (SQLAlchemyError, OSError) as exc:
            _log.warning("budget reservation failed (%s): denying", type(exc).__name__)
            return CheckResult(False, f"budget store unavailable ({type(exc).__name__})")
        if isinstance(outcome, BudgetRow):
            return CheckResult(
                False, f"{outcome.label()}: {_fraction(outcome)}, cost {cost}", "budget_exceeded"
            )
        note = "; ".join(f"{row.label()}: {_fraction(row)}" for row in outcome)
        return CheckResult(True, f"{note} (cost {cost})", undo=self._undo(spans, cost))

    async def _reserve(
        self, spans: list[_Span], cost: int, now: int
    ) -> BudgetRow | list[BudgetRow]:
        """The reservation in a thread. If the check is cancelled (its timeout, the
        request gone) while the thread runs, what it reserved is released after."""
        task = asyncio.ensure_future(asyncio.to_thread(self._store.reserve, spans, cost, now))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._pending.add(task)
            task.add_done_callback(lambda t: self._release_orphan(t, spans, cost))
            raise

    def _release_orphan(self, task: asyncio.Task[object], spans: list[_Span], cost: int) -> None:
        self._pending.discard(task)
        if task.cancelled() or task.exception() is not None or not isinstance(task.result(), list):
            return
        release = asyncio.ensure_future(self._undo(spans, cost)())
        self._pending.add(release)
        release.add_done_callback(self._pending.discard)

    def _undo(self, spans: list[_Span], cost: int) -> Undo:
        done = False

        async def undo() -> None:
            nonlocal done
            if done:  # once: a second call would give back someone else's spend
                return
            done = True
            try:
                await asyncio.to_thread(self._store.release, spans, cost, int(self._clock()))
            except (SQLAlchemyError, OSError) as exc:  # the reservation stays: never overshoots
                _log.warning("budget release failed (%s): still reserved", type(exc).__name__)

        return undo

    async def settle(self, tree: str, tenant: str, delta: int) -> list[BudgetRow]:
        """Correct tree ``tree`` and tenant ``tenant`` (today, UTC) by ``delta``.

        ``delta`` is an integer in [-MAX_COST, MAX_COST]: positive when the request
        cost more than its rule's estimate (recorded even past the limit), negative
        when less. Both rows change or neither; ValueError if either would go
        below zero; database errors propagate (``sqlalchemy.exc.SQLAlchemyError``).
        """
        tree, tenant = _name(tree, "tree"), _name(tenant, "tenant")
        if type(delta) is not int or not -MAX_COST <= delta <= MAX_COST:
            raise ValueError(f"delta must be an integer in [-{MAX_COST}, {MAX_COST}]")
        spans, now = self._spans(tree, tenant)
        return await asyncio.to_thread(self._store.settle, spans, delta, now)
