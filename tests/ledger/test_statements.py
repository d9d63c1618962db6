"""Statements from one snapshot, in O(period): they add up while transfers commit, agree with
the account's whole history across period boundaries, and stay off the writer's thread."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import timedelta
from typing import Any

import pytest

from tests.ledger.test_store import START, Clock, run, url, with_ledger  # noqa: F401
from tokenworks.db.reads import ReadTimeout
from tokenworks.ledger import Ledger, Refused, store_sqlite
from tokenworks.ledger.periods import from_ms
from tokenworks.ledger.schema import PERIOD_MS

WAIT_S = 20.0


async def _transfers(L: Ledger) -> list[tuple[int, int, int, int]]:
    """(ts_ms, debit, credit, amount) of every stored transfer: the whole history."""
    q = "SELECT ts_ms, debit_account_id, credit_account_id, amount_nano FROM ledger_transfers"
    store: Any = L.store
    if store.dialect == "sqlite":
        return await store._run(store._all, q)
    return await store._all(q)


def _net_before(history: list[tuple[int, int, int, int]], account: int, t_ms: int) -> int:
    return sum(
        (a if c == account else 0) - (a if d == account else 0)
        for ts, d, c, a in history
        if ts < t_ms
    )


def test_statements_add_up_while_transfers_commit(url: str) -> None:  # noqa: F811
    """Hammer: statements taken while holds settle, top-ups and transfers commit, over weeks
    of clock time (several periods), always add up; at rest each opening and closing equals
    the sum of the account's whole history before it."""

    async def body(L: Ledger, clock: Clock) -> None:
        rnd = random.Random(13)
        org = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        accounts = [org] + [
            (await L.create_account(f"team{i}", org, "team", idempotency_key=f"team{i}")).id
            for i in range(3)
        ]
        for a in accounts:
            await L.top_up(a, 10_000_000, idempotency_key=f"t{a}")
        stop = asyncio.Event()
        statements = 0

        async def traffic(worker: int) -> None:
            for i in range(120):
                a = rnd.choice(accounts)
                rid = f"w{worker}-{i}"
                roll = rnd.random()
                try:
                    if roll < 0.6:
                        await L.hold([a], 5_000, request_id=rid)
                        await L.settle(
                            rid, price_nano=rnd.randint(1, 5_000), cost_nano=10,
                            producer="p", model="m",
                        )  # fmt: skip
                    elif roll < 0.8:
                        await L.top_up(a, rnd.randint(1, 9_000), idempotency_key=rid)
                    else:
                        b = rnd.choice([x for x in accounts if x != a])
                        await L.transfer(
                            a, b, rnd.randint(1, 900), idempotency_key=rid, actor="operator"
                        )
                except Refused:
                    pass
                clock.advance(rnd.choice([1, 60, 3_600, 40_000]))  # crosses weekly periods
                await asyncio.sleep(0)

        async def reader() -> None:
            nonlocal statements
            while not stop.is_set():
                a = rnd.choice(accounts)
                now = from_ms(L.now_ms())
                since = now - timedelta(days=rnd.choice([1, 7, 30]))
                st = await L.statement(a, since, now + timedelta(days=1))  # raises if not
                moved = sum(v for k, v in st.items() if k.endswith("_nano") and k in _IN)
                moved -= sum(v for k, v in st.items() if k.endswith("_nano") and k in _OUT)
                assert st["opening_nano"] + moved == st["closing_nano"]
                statements += 1

        readers = [asyncio.create_task(reader()) for _ in range(2)]
        await asyncio.gather(*(traffic(w) for w in range(4)))
        stop.set()
        await asyncio.gather(*readers)
        assert statements > 10
        await L.flush()
        history = await _transfers(L)
        span = max(ts for ts, *_ in history) - min(ts for ts, *_ in history)
        assert span > 3 * PERIOD_MS, "the traffic should cross several periods"
        start_ms = min(ts for ts, *_ in history)
        for a in accounts:
            for _ in range(6):
                t0 = start_ms + rnd.randrange(span)
                t1 = t0 + rnd.choice([1, 86_400_000, 7 * 86_400_000, PERIOD_MS * 3])
                st = await L.statement(a, from_ms(t0), from_ms(t1))
                assert st["opening_nano"] == _net_before(history, a, t0)
                assert st["closing_nano"] == _net_before(history, a, t1)
            whole = await L.statement(a, START - timedelta(days=1), from_ms(L.now_ms() + 1))
            assert whole["closing_nano"] == L.balance(a).balance_nano
        assert await L.check() == []

    run(with_ledger(url, body))


_IN = {"top_ups_nano", "grants_nano", "transfers_in_nano", "other_in_nano"}
_OUT = {"transfers_out_nano", "expired_nano", "spend_nano", "other_out_nano"}


def test_a_statement_reads_off_the_writers_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement held up in its read does not hold up settlements: the settlement becomes
    durable first (on the writer's thread it would wait behind the read, and the order flip)."""
    entered, release = threading.Event(), threading.Event()
    read = store_sqlite.read_statement

    def slow_read(*args: Any) -> Any:
        entered.set()
        release.wait(WAIT_S)
        return read(*args)

    monkeypatch.setattr(store_sqlite, "read_statement", slow_read)

    async def body(L: Ledger, clock: Clock) -> None:
        a = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(a, 1_000_000, idempotency_key="t")
        done: list[str] = []

        async def statement() -> None:
            await L.statement(a, START - timedelta(days=1), START + timedelta(days=1))
            done.append("statement")

        task = asyncio.create_task(statement())
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        await L.hold([a], 500, request_id="r")
        await L.settle("r", price_nano=400, cost_nano=1, producer="p", model="m")
        done.append("settled")
        release.set()
        await task
        assert done == ["settled", "statement"]

    run(with_ledger(f"sqlite:///{tmp_path}/ledger.db", body))


# Movements that take minutes to read (a count to 10^10), on either database.
SLOW_MOVEMENTS = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 10000000000) SELECT 'spend', 0, NULL, count(*), NULL FROM c WHERE :acc > 0",
    "postgres": "SELECT 'spend', 0, NULL, count(*), NULL "
    "FROM generate_series(1, 10000000000) WHERE :acc > 0",
}


def test_a_statement_past_its_time_limit_raises_read_timeout(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenworks.ledger import store_postgres

    async def body(L: Ledger, clock: Clock) -> None:
        a = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(a, 700, idempotency_key="t")
        module = store_sqlite if L.store.dialect == "sqlite" else store_postgres
        with monkeypatch.context() as m:
            m.setattr(module, "MOVEMENTS", SLOW_MOVEMENTS[L.store.dialect])
            L.read_timeout_s = 0.2
            with pytest.raises(ReadTimeout):
                await L.statement(a, START - timedelta(days=1), START + timedelta(days=1))
        # The read connection is usable again, with no limit left behind on it.
        st = await L.statement(a, START - timedelta(days=1), START + timedelta(days=1))
        assert st["closing_nano"] == 700

    run(with_ledger(url, body))


def test_period_nets_are_exact_past_int64_and_rebuilt_for_an_older_ledger(
    url: str,  # noqa: F811
) -> None:
    """Three top-ups of 2^62 in one period pass int64 in the account's (and the top-up
    source's) period net; the opening of a later statement is still exact. A ledger from
    before the period table (its rows gone) gets them computed again when it opens."""
    big = 2**62
    clock = Clock(START)

    async def fill(L: Ledger, clock: Clock) -> int:
        a = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        for i in range(3):
            await L.top_up(a, big, idempotency_key=f"t{i}")
        clock.advance(PERIOD_MS / 1000 * 2)
        await L.top_up(a, 5, idempotency_key="late")
        return a

    async def statements(L: Ledger, a: int) -> tuple[int, int]:
        now = from_ms(L.now_ms())
        st = await L.statement(a, now - timedelta(hours=1), now + timedelta(hours=1))
        return st["opening_nano"], st["closing_nano"]

    async def first(L: Ledger, clock: Clock) -> tuple[int, tuple[int, int]]:
        a = await fill(L, clock)
        return a, await statements(L, a)

    a, got = run(with_ledger(url, first, clock))
    assert got == (3 * big, 3 * big + 5)

    async def forget_periods(L: Ledger, clock: Clock) -> None:
        store: Any = L.store
        if store.dialect == "sqlite":
            await store._run(store.conn.execute, "DELETE FROM ledger_account_periods")
        else:
            async with store._pool.acquire() as c:
                await c.execute("DELETE FROM ledger_account_periods")

    run(with_ledger(url, forget_periods, clock))

    async def reopened(L: Ledger, clock: Clock) -> tuple[int, int]:
        assert await L.check() == []
        return await statements(L, a)

    assert run(with_ledger(url, reopened, clock)) == (3 * big, 3 * big + 5)


def test_check_sees_period_nets_that_disagree_with_the_transfers(url: str) -> None:  # noqa: F811
    async def body(L: Ledger, clock: Clock) -> None:
        a = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(a, 700, idempotency_key="t")
        assert await L.check() == []
        store: Any = L.store
        sql = f"UPDATE ledger_account_periods SET net_nano = net_nano + 1 WHERE account_id = {a}"
        if store.dialect == "sqlite":
            await store._run(store.conn.execute, sql)
        else:
            async with store._pool.acquire() as c:
                await c.execute(sql)
        assert any(f"store account {a}: period nets 701" in v for v in await L.check())

    run(with_ledger(url, body))
