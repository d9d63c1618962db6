"""Closed holds compacted past their retention, on SQLite and PostgreSQL: check() still
passes, while a hammer of holds runs next to the compaction, and still catches a wrong sum."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from typing import Any

import psycopg

from tests.ledger.test_store import START, Clock, org_tree, run, url, with_ledger
from tokenworks.db import backend, split_schema, sqlite_path
from tokenworks.ledger import Ledger, Refused
from tokenworks.ledger.compaction import MIN_HOLDS_DAYS, HoldCompactor

DAY_S = 86_400
__all__ = ["url"]  # the fixture: both stores


def _sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    if backend(url) == "sqlite":
        conn = sqlite3.connect(sqlite_path(url))
        try:
            with conn:
                return conn.execute(sql).fetchall()
        finally:
            conn.close()
    conninfo, schema = split_schema(url)
    with psycopg.connect(conninfo, options=f"-c search_path={schema}", autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


async def _traffic(L: Ledger, agents: list[int], prefix: str, n: int, seed: int) -> int:
    """n concurrent requests: settled, voided or abandoned; returns how many settled."""
    rnd = random.Random(seed)
    settled = 0

    async def request(i: int) -> None:
        nonlocal settled
        amount = rnd.randint(100, 2_000)
        rid = f"{prefix}{i}"
        key = rnd.choice(["k-main", "k-sub"])
        try:
            await L.hold([rnd.choice(agents)], amount, request_id=rid, key_scopes=[key], ttl_s=30)
        except Refused:
            return
        await asyncio.sleep(rnd.random() / 500)
        roll = rnd.random()
        if roll < 0.75:
            price = rnd.randint(0, amount + 100)
            await L.settle(rid, price_nano=price, cost_nano=price // 3, producer="p", model="m")
            settled += 1
        elif roll < 0.9:
            await L.void(rid)

    await asyncio.gather(*(request(i) for i in range(n)))
    return settled


def test_check_passes_after_compaction_under_load(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        org, _team, user = await org_tree(L)
        agents = [
            (await L.create_account(f"agent{i}", user, "agent", idempotency_key=f"ag{i}")).id
            for i in range(4)
        ]
        await L.top_up(org, 10**9, idempotency_key="top")
        for i, a in enumerate(agents):  # lifetime budgets: their checks read every hold
            await L.set_budget(a, 10**8, "total", idempotency_key=f"b-a{i}")
        await L.set_budget(("key", "k-main"), 10**8, "month", idempotency_key="b-key")
        await L.set_budget(user, 10**8, "day", idempotency_key="b-user")
        await L.delegate("k-main", "k-sub", 10**7, idempotency_key="d-sub", ttl_s=400 * DAY_S)
        assert await _traffic(L, agents, "old", 300, seed=1) > 0
        clock.advance(31)
        await L.sweep_expired()  # the abandoned holds expire: closed too
        await L.flush()
        old = _sql(url, "SELECT COUNT(*) FROM ledger_holds")[0][0]
        assert old > 0
        assert await L.check() == []

        clock.advance(60 * DAY_S)
        now_ms = L.now_ms()
        compactor = HoldCompactor(url)
        try:
            # Compaction in small batches on its own thread, while new holds settle.
            compacting = asyncio.to_thread(
                compactor.compact, now_ms - MIN_HOLDS_DAYS * DAY_S * 1000, now_ms, 7, 1000
            )
            done, new_settled = await asyncio.gather(
                compacting, _traffic(L, agents, "new", 300, seed=2)
            )
        finally:
            compactor.close()
        assert done == old
        assert new_settled > 0
        await L.flush()
        assert await L.check() == [], "check must pass after compaction"
        (compacted,) = _sql(url, "SELECT SUM(holds) FROM ledger_holds_compacted")[0]
        assert int(compacted) == old
        assert _sql(url, "SELECT COUNT(*) FROM ledger_holds WHERE closed_ms < 0 + "
                    f"{now_ms - MIN_HOLDS_DAYS * DAY_S * 1000}")[0][0] == 0  # fmt: skip

        # What the check still sees: a compacted sum that no longer matches the transfers.
        _sql(url, "UPDATE ledger_holds_compacted SET price_nano = price_nano + 1"
                  " WHERE day = (SELECT MIN(day) FROM ledger_holds_compacted"
                  " WHERE status = 'settled') AND status = 'settled'")  # fmt: skip
        problems = await L.check()
        assert any("(compacted holds)" in p for p in problems), problems
        assert any("budget" in p for p in problems), problems  # a lifetime budget's spend

    run(with_ledger(url, body, Clock(START)))


def test_compaction_keeps_every_period_budget_can_see(url: str) -> None:
    """Holds younger than MIN_HOLDS_DAYS stay rows whatever the asked retention."""

    async def body(L: Ledger, clock: Clock) -> None:
        org, _team, user = await org_tree(L)
        await L.top_up(org, 10**6, idempotency_key="top")
        await L.hold([user], 500, request_id="r1")
        await L.settle("r1", price_nano=300, cost_nano=100, producer="p", model="m")
        await L.flush()
        clock.advance(20 * DAY_S)
        now_ms = L.now_ms()
        compactor = HoldCompactor(url)
        try:
            assert compactor.compact(now_ms, now_ms) == 0
            clock.advance(20 * DAY_S)
            assert compactor.compact(L.now_ms(), L.now_ms()) == 1
        finally:
            compactor.close()
        assert await L.check() == []

    run(with_ledger(url, body, Clock(START)))
