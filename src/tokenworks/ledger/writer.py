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
from tokenworks.ledger.store import Store

log = logging.getLogger("tokenworks.ledger")

WRITE_RETRIES = 5
RETRY_BASE_S = 0.05


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
        await self.wait_durable(self.engine.seq)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self.engine.take_batch()
            if not batch.is_empty():
                try:
                    await self._write(batch)
                except BaseException as exc:
                    self.failure = exc
                    log.error("ledger store failed, writes stop: %r", exc)
                    self._fail_waiters(exc)
                    return
                self.batches += 1
            self.durable_seq = max(self.durable_seq, batch.seq)
            while self._waiters and self._waiters[0][0] <= self.durable_seq:
                _, fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
            if self._waiters or self.engine.pending_ops():
                self._wake.set()
            elif self._stopping:
                return

    async def _write(self, batch: Batch) -> None:
        for attempt in range(WRITE_RETRIES):
            try:
                await self.store.write(batch)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt == WRITE_RETRIES - 1:
                    raise
                log.warning("ledger write failed (attempt %d): %r", attempt + 1, exc)
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)

    def _fail_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            _, fut = self._waiters.popleft()
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
