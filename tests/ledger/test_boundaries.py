"""A month boundary where every tenant's grant renews at once is bounded work: many small
batches, none past the backpressure limit, every grant renewed, and holds keep being served
(and see their own renewal) while the backlog drains."""

from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tokenworks.ledger import Ledger, Period, Recurrence
from tokenworks.ledger.engine import SWEEP_TURN_OPS
from tokenworks.ledger.facade import MAX_PENDING_OPS
from tokenworks.ledger.rows import Batch

USERS = 100_000
GRANT_NANO = 1_000
START = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
MONTH_END_S = datetime(2026, 4, 1, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.t = START.timestamp()

    def __call__(self) -> float:
        return self.t


def ops(batch: Batch) -> int:
    """What `Engine.pending_ops` counts, for a batch the writer took."""
    return len(batch.transfers) + len(batch.holds) + len(batch.idempotency)


# The issue's own scale (100,000 tenants): about 70 s alone here, more beside other tests.
@pytest.mark.timeout(300)
def test_100k_monthly_grants_renewing_at_once_are_bounded_batches(tmp_path: Path) -> None:
    async def body() -> None:
        clock = Clock()
        L = await Ledger.open(f"sqlite:///{tmp_path}/l.db", clock=clock, sweep_interval_s=None)
        try:
            e = L.engine
            now_ms = L.now_ms()
            monthly = Recurrence(Period.MONTH)
            users: list[int] = []
            for i in range(USERS):  # the engine directly: 200,000 admin writes, unawaited
                acc = e.create_account(
                    f"u{i}", None, "organisation", draws_on_parent=False,
                    idempotency_key=f"a{i}", now_ms=now_ms,
                )  # fmt: skip
                users.append(acc["id"])
                e.grant(
                    acc["id"], GRANT_NANO, recurring=monthly, rollover_cap_nano=0, priority=0,
                    expires_ms=None, effective_ms=None, idempotency_key=f"g{i}", now_ms=now_ms,
                )  # fmt: skip
                if i % 10_000 == 0:
                    await L.flush()
            payer = e.create_account(
                "payer", None, "organisation", draws_on_parent=False, idempotency_key="p",
                now_ms=now_ms,
            )["id"]  # fmt: skip
            e.top_up(payer, 10**9, idempotency_key="pt", now_ms=now_ms)
            await L.flush()
            # As `tokenworks serve` does once the ledger is loaded (app.py): 100,000 tenants'
            # objects out of the collector's sight, or its full passes walk them all.
            gc.collect()
            gc.freeze()

            batches: list[int] = []
            write = L.store.write

            async def counting_write(batch: Batch, attached: Any = ()) -> None:
                batches.append(ops(batch))
                await write(batch, attached)

            L.store.write = counting_write  # type: ignore[method-assign]
            clock.t = MONTH_END_S + 1  # midnight on the 1st: every grant is due
            last = users[-1]
            held_during_backlog = 0

            async def holds() -> None:
                nonlocal held_during_backlog
                for i in range(200):
                    if not e.grants_due(L.now_ms()):
                        break
                    held_during_backlog += 1
                    await L.hold([payer], 10, request_id=f"h{i}")  # never LedgerBusy
                    await L.settle(f"h{i}", price_nano=5, cost_nano=1, producer="p", model="m")
                    await asyncio.sleep(0)

            # A tenant the sweep reaches last holds first: its own renewal is applied for it.
            await L.hold([last], GRANT_NANO, request_id="last")
            assert e.grants[e._account_grants[last][0]].next_due_ms > L.now_ms()
            assert e.grants_due(L.now_ms()), "the renewal of one tenant ran every tenant's"
            sweeping = asyncio.create_task(L._sweep_due(L.now_ms))
            await holds()
            totals = await sweeping
            await L.flush()
            assert held_during_backlog > 0, "no hold was placed while renewals were pending"
            assert not e.grants_due(L.now_ms())
            assert totals["grant_events"] > 0
            # About one turn a batch (plus the holds settled beside it), far below the limit.
            assert max(batches) <= 2 * SWEEP_TURN_OPS < MAX_PENDING_OPS, max(batches)
            assert len(batches) > 2
            renewed = [g for g in e.grants.values() if g.next_due_ms is not None]
            assert len(renewed) == USERS
            first_of_may = datetime(2026, 5, 1, tzinfo=UTC).timestamp() * 1000
            assert all(g.next_due_ms == first_of_may for g in renewed)
            # Each tenant's old month expired and a new one was issued, all durable. No admin
            # read limit: the check of 100,000 tenants beside a busy suite may take longer
            # than an admin would wait (the test's own timeout bounds it).
            L.read_timeout_s = None
            assert await L.check() == []
        finally:
            gc.unfreeze()
            await L.close()

    asyncio.run(body())


def test_a_long_catch_up_is_spread_over_turns_too() -> None:
    """A daily grant that takes effect 300 days back is 300 periods: no turn does more than
    its share, and the turns together bring it up to date."""
    from tokenworks.ledger.engine import Engine

    e = Engine()
    day_ms = 86_400_000
    now_ms = int(START.timestamp() * 1000)
    e.bootstrap(now_ms)
    acc = e.create_account(
        "u", None, "organisation", draws_on_parent=False, idempotency_key="a", now_ms=now_ms
    )["id"]
    e.grant(
        acc, GRANT_NANO, recurring=Recurrence(Period.DAY), rollover_cap_nano=0, priority=0,
        expires_ms=None, effective_ms=now_ms + day_ms, idempotency_key="g", now_ms=now_ms,
    )  # fmt: skip
    later_ms = now_ms + 301 * day_ms
    e.take_batch()
    turns = 0
    for turns in range(1, 100):  # noqa: B007
        more = e.sweep(later_ms, max_items=40)["more"]
        assert len(e.take_batch().transfers) <= 40 * 3
        if not more:
            break
    assert turns >= 300 // 40
    (g,) = e.grants.values()
    assert g.next_due_ms is not None and g.next_due_ms > later_ms
    assert e.balance(acc, later_ms).balance_nano == GRANT_NANO
