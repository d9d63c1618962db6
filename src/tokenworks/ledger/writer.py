"""Group commit: one writer task persists whatever the engine journalled, one batch per
transaction, in the order the engine applied it.

While a commit is in flight new operations accumulate, so under load each transaction
carries many requests and the cost of a commit (an fsync) is shared. A caller that needs
durability (a settlement, an admin write) awaits the commit that covers its sequence number.
A failed write is retried with backoff; past its retries the writer stops and every waiter
(and every later write) gets `StoreUnavailable`: the ledger fails closed, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from tokenworks.ledger.domain import StoreUnavailable
from tokenworks.ledger.engine import Batch, Engine
from tokenworks.ledger.store import Attachment, Columns, Store

log = logging.getLogger("tokenworks.ledger")

WRITE_RETRIES = 5
RETRY_BASE_S = 0.05
MAX_ATTACHED_ROWS = 100_000  # past this, attach() refuses and the caller writes elsewhere
# Group-commit linger: wait at most the store's `linger_s` for more operations while at least
# this many requests hold credit (are in flight), or until this many operations are pending.
LINGER_STEP_S = 0.0005
LINGER_MIN_IN_FLIGHT = 8
LINGER_ENOUGH_OPS = 256


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

    def attach(self, table: str, columns: Columns, row: tuple[object, ...]) -> bool:
        """Commit `row` in the next batch's transaction; False when the writer is failed or
        full (the caller then stores the row by other means)."""
        if self.failure is not None or self._attached_rows >= MAX_ATTACHED_ROWS:
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
            batch = self.engine.take_batch()
            attached, attached_seq = self._take_attached()
            if not batch.is_empty() or attached:
                try:
                    await self._write(batch, attached)
                except BaseException as exc:
                    self.failure = exc
                    log.error("ledger store failed, writes stop: %r", exc)
                    self._fail_waiters(exc)
                    return
                self.batches += 1
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

    async def _write(self, batch: Batch, attached: list[Attachment]) -> None:
        for attempt in range(WRITE_RETRIES):
            try:
                await self.store.write(batch, attached)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == WRITE_RETRIES - 1:
                    raise
                log.warning("ledger write failed (attempt %d): %r", attempt + 1, exc)
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiters in (self._waiters, self._attach_waiters):
            while waiters:
                _, fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(StoreUnavailable(f"ledger store failed: {exc!r}"))

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
