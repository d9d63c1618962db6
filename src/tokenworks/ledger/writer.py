"""Group commit: one writer task persists whatever the engine journalled, one batch per
transaction, in the order the engine applied it.

While a commit is in flight new operations accumulate, so under load each transaction
carries many requests and the cost of a commit (an fsync) is shared. A caller that needs
durability (a settlement, an admin write) awaits the commit that covers its sequence number.

Two kinds of failure, told apart by `Store.refuses`:
- the store refuses a value (out of its column's range, a text it cannot hold): retrying
  the same rows fails the same way, so the failure is confined to its row. The ledger's own
  rows are storable by construction (every amount and time is bounded where it enters the
  engine, running totals are wide columns), so a refused row is an attached one: the batch
  is committed without them, then they are halved until each refused row is alone; that
  row is dropped (logged, counted in `refused_rows`) and the rest committed. Rows that do
  not fit their columns are refused at `attach` already, so this is the rare path.
- the store is unavailable (connection lost, disk full, locked): the write is retried with
  backoff; past its retries the writer stops and every waiter (and every later write) gets
  `StoreUnavailable`: the ledger fails closed, never silently. So does a ledger row the
  store refuses, which would be a bug: dropping it would lose a charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from tokenworks.db.table import Columns
from tokenworks.ledger.domain import StoreUnavailable
from tokenworks.ledger.engine import Engine
from tokenworks.ledger.rows import Batch
from tokenworks.ledger.store import Attachment, Store, StoreSnapshot

log = logging.getLogger("tokenworks.ledger")

WRITE_RETRIES = 5
RETRY_BASE_S = 0.05
MAX_ATTACHED_ROWS = 100_000  # past this, attach() refuses and the caller writes elsewhere
# Group-commit linger: wait at most the store's `linger_s` for more operations while at least
# this many requests hold credit (are in flight), or until this many operations are pending.
LINGER_STEP_S = 0.0005
LINGER_MIN_IN_FLIGHT = 8
LINGER_ENOUGH_OPS = 256
REFUSAL_LOG_INTERVAL_S = 10.0

T = TypeVar("T")
AttachedRow = tuple[str, Columns, tuple[Any, ...]]

# What the SQL types of attached columns can hold, in both stores (PostgreSQL's INTEGER is
# 32 bits; SQLite's would take more, but a row must fit both).
_INT_RANGES = {
    "bigint": (-(2**63), 2**63 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "smallint": (-(2**15), 2**15 - 1),
}
_STRUCT_CODES = {"bigint": "q", "integer": "i", "smallint": "h"}
_FLOAT_TYPES = frozenset({"double precision", "real", "float"})


class RowCheck:
    """Whether a row fits the integer columns it is attached with, so that a figure no column
    can hold (a token count of 1e19) is turned away at `attach` and never reaches, let alone
    fails, a commit. One `struct.pack` of those values: C code that refuses an int out of
    its C type's range (about 3,000 instructions a row, a quarter of a min/max pair)."""

    def __init__(self, columns: Columns) -> None:
        self.columns = columns
        self.width = len(columns)
        idx = [i for i, (_, ty) in enumerate(columns) if ty.lower() in _INT_RANGES]
        codes = "".join(_STRUCT_CODES[columns[i][1].lower()] for i in idx)
        # itemgetter(i, i): a tuple even for one column (so the format repeats the first)
        self.get = itemgetter(*idx, idx[0]) if idx else None
        self.pack = struct.Struct("<" + codes + codes[:1]).pack

    def problem(self, row: tuple[Any, ...]) -> str | None:
        """Why the row cannot be stored, or None."""
        if len(row) != self.width:
            return f"{len(row)} values for {self.width} columns"
        if self.get is not None:
            try:
                self.pack(*self.get(row))
            except struct.error:  # out of range, or a NULL or a float: look closer
                return self._slow(row)
        # Floats are not looked at here: a NaN or an infinity (which no store keeps in a
        # NOT NULL column) is rare enough for the commit's isolation to find.
        return None

    def _slow(self, row: tuple[Any, ...]) -> str | None:
        for (name, ty), v in zip(self.columns, row, strict=True):
            ty = ty.lower()
            if v is None:
                continue
            if ty in _INT_RANGES:
                lo, hi = _INT_RANGES[ty]
                if not isinstance(v, int | float) or not lo <= v <= hi:
                    return f"{name}={v!r} does not fit {ty}"
            elif ty in _FLOAT_TYPES and (not isinstance(v, int | float) or v - v != 0):
                return f"{name}={v!r} is not a finite number"
        return None


class GroupCommitWriter:
    def __init__(self, engine: Engine, store: Store) -> None:
        self.engine = engine
        self.store = store
        self.durable_seq = engine.seq
        self.batches = 0
        self.failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Rows of other tables that ride in the next transaction, by (table, columns).
        self._attached: dict[tuple[str, Columns], list[tuple[object, ...]]] = {}
        self._attached_rows = 0
        self.attached_seq = 0  # rows attached so far
        self.durable_attached_seq = 0  # of those, committed
        self._attach_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._row_checks: dict[int, RowCheck] = {}  # by id(columns)
        self.refused_rows = 0  # attached rows not taken or not stored: they did not fit
        self._refusal_logged_s = 0.0
        # check() requests: a function run on the engine at the next commit boundary, and
        # the future that gets its result with a store snapshot as of that commit.
        self._cuts: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []

    def attach(self, table: str, columns: Columns, row: tuple[object, ...]) -> bool:
        """Commit `row` in the next batch's transaction; False when the writer is failed or
        full, or the row does not fit its columns (the caller then stores the row by other
        means, or not at all)."""
        if self.failure is not None or self._attached_rows >= MAX_ATTACHED_ROWS:
            return False
        check = self._row_checks.get(id(columns))
        if check is None or check.columns is not columns:
            check = self._row_checks[id(columns)] = RowCheck(columns)
        if (why := check.problem(row)) is not None:
            self._refused(table, row, why)
            return False
        self._attached.setdefault((table, columns), []).append(row)
        self._attached_rows += 1
        self.attached_seq += 1
        self._wake.set()
        return True

    def _take_attached(self) -> tuple[list[Attachment], int]:
        taken = [(table, cols, rows) for (table, cols), rows in self._attached.items()]
        self._attached = {}
        self._attached_rows = 0
        return taken, self.attached_seq

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    def poke(self) -> None:
        self._wake.set()

    async def wait_durable(self, seq: int) -> None:
        """Return once everything up to `seq` is committed."""
        if self.failure is not None:
            raise StoreUnavailable(f"ledger store failed: {self.failure!r}")
        if seq <= self.durable_seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        self._wake.set()
        await fut

    async def flush(self) -> None:
        """Wait until everything journalled and attached so far is committed."""
        target = self.attached_seq
        await self.wait_durable(self.engine.seq)
        if self.durable_attached_seq >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._attach_waiters.append((target, fut))
        self._wake.set()
        await fut

    async def cut(self, capture: Callable[[], T]) -> tuple[T, StoreSnapshot]:
        """Run `capture` on the engine at a commit boundary (just as the writer takes a batch,
        so the engine's state is the batch's) and, once that batch is committed, open a store
        snapshot: the two describe the same instant, whatever traffic does meanwhile. The
        caller closes the snapshot."""
        if self.failure is not None:
            raise StoreUnavailable(f"ledger store failed: {self.failure!r}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._cuts.append((capture, fut))
        self._wake.set()
        result: tuple[T, StoreSnapshot] = await fut  # one future type serves cuts of any T
        return result

    def _refused(self, table: str, row: tuple[Any, ...], why: str) -> None:
        self.refused_rows += 1
        now_s = time.monotonic()
        if now_s - self._refusal_logged_s >= REFUSAL_LOG_INTERVAL_S:  # a flood logs once
            self._refusal_logged_s = now_s
            log.error(
                "a %s row (%r) cannot be stored and is dropped: %s (%d so far)",
                table, row[0] if row else None, why, self.refused_rows,
            )  # fmt: skip

    async def _linger(self) -> None:
        """Under load, wait a moment so one commit carries more requests.

        Where a commit has a fixed cost on the gateway's core (SQLite: a transaction, a
        statement per table, an fsync, two thread hand-offs), the settlements of requests
        still in flight are about to arrive, and sharing one commit among them is cheaper
        than one commit each. With nothing in flight (a lone request) there is nothing to
        wait for; the store says how long is worth it (`Store.linger_s`; none for PostgreSQL).
        """
        waited_s = 0.0
        while (
            waited_s < self.store.linger_s
            and len(self.engine.holds) >= LINGER_MIN_IN_FLIGHT
            and self.engine.pending_ops() < LINGER_ENOUGH_OPS
        ):
            await asyncio.sleep(LINGER_STEP_S)
            waited_s += LINGER_STEP_S

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await self._linger()
            self._wake.clear()
            if self._cuts:
                with self.engine._lock:  # the cut sees exactly the state the batch leaves
                    batch = self.engine.take_batch()
                    cuts = self._capture_cuts()
            else:
                batch, cuts = self.engine.take_batch(), []
            attached, attached_seq = self._take_attached()
            if not batch.is_empty() or attached:
                try:
                    await self._commit(batch, attached)
                except BaseException as exc:
                    self.failure = exc
                    log.error("ledger store failed, writes stop: %r", exc)
                    self._fail_waiters(exc, cuts)
                    return
                self.batches += 1
            if cuts:
                await self._open_snapshots(cuts)
            self.durable_seq = max(self.durable_seq, batch.seq)
            self.durable_attached_seq = attached_seq
            for waiters, durable in (
                (self._waiters, self.durable_seq),
                (self._attach_waiters, self.durable_attached_seq),
            ):
                while waiters and waiters[0][0] <= durable:
                    _, fut = waiters.popleft()
                    if not fut.done():
                        fut.set_result(None)
            if self._waiters or self._attach_waiters or self.engine.pending_ops() or self._attached:
                self._wake.set()
            elif self._stopping:
                return

    def _capture_cuts(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        taken: list[tuple[Any, asyncio.Future[Any]]] = []
        cuts, self._cuts = self._cuts, []
        for capture, fut in cuts:
            if fut.done():  # its check gave up (cancelled, timed out): copy nothing for it
                continue
            try:
                taken.append((capture(), fut))
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
        return taken

    async def _open_snapshots(self, cuts: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        """Right after the commit the cuts were captured at, before the next one."""
        for value, fut in cuts:
            try:
                snap = await self.store.snapshot()
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                continue
            if fut.done():  # the checker gave up waiting
                await snap.close()
            else:
                fut.set_result((value, snap))

    async def _commit(self, batch: Batch, attached: list[Attachment]) -> None:
        """Write a batch and its attached rows; a refused attached row is dropped alone."""
        try:
            await self._write(batch, attached)
            return
        except Exception as exc:
            if not attached or not self.store.refuses(exc):
                raise
            log.warning("the store refused a row of a batch; isolating it: %r", exc)
        await self._write(batch, [])  # the ledger's rows, which must go through
        rows = [(table, cols, row) for table, cols, rows in attached for row in rows]
        await self._isolate(Batch.empty(batch.seq), rows)

    async def _isolate(self, empty: Batch, rows: list[AttachedRow]) -> None:
        """Commit `rows` but those the store refuses: halve until each refused row is alone.
        k refused rows among n cost about 2k log2(n) small transactions."""
        grouped: dict[tuple[str, Columns], list[tuple[Any, ...]]] = {}
        for table, cols, row in rows:
            grouped.setdefault((table, cols), []).append(row)
        try:
            await self._write(empty, [(t, c, r) for (t, c), r in grouped.items()])
            return
        except Exception as exc:
            if not self.store.refuses(exc):
                raise
            if len(rows) == 1:
                self._refused(rows[0][0], rows[0][2], repr(exc))
                return
        mid = len(rows) // 2
        await self._isolate(empty, rows[:mid])
        await self._isolate(empty, rows[mid:])

    async def _write(self, batch: Batch, attached: list[Attachment]) -> None:
        """One transaction, retried while the store is unavailable; a refusal is raised at
        once (the same rows would fail again)."""
        for attempt in range(WRITE_RETRIES):
            try:
                await self.store.write(batch, attached)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.store.refuses(exc) or attempt == WRITE_RETRIES - 1:
                    raise
                log.warning("ledger write failed (attempt %d): %r", attempt + 1, exc)
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)

    def _fail_waiters(
        self, exc: BaseException, cuts: Sequence[tuple[Any, asyncio.Future[Any]]] = ()
    ) -> None:
        error = StoreUnavailable(f"ledger store failed: {exc!r}")
        for waiters in (self._waiters, self._attach_waiters):
            while waiters:
                _, fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(error)
        for _, fut in [*cuts, *self._cuts]:
            if not fut.done():
                fut.set_exception(error)
        self._cuts = []

    async def stop(self) -> None:
        """Flush what is journalled, then end the task."""
        if self._task is None:
            return
        if self.failure is None and not self._task.done():
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, timeout=5)
        self._task = None
