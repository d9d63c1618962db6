"""No input and no upstream can lose a charge or take billing down (issue 8, the ledger).

Each test runs on SQLite and PostgreSQL: a figure no column can hold, a row the store
refuses, totals past int64, a check under steady traffic, and a concurrent hammer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.ledger.test_store import START, Clock, _pg_schema_url, org_tree, run, with_ledger
from tokenworks.ledger import (
    AccountKind,
    InvalidRequest,
    Ledger,
    Period,
    Recurrence,
    Refused,
    StoreUnavailable,
)
from tokenworks.ledger.domain import MAX_AMOUNT_NANO
from tokenworks.metering.store import USAGE_SCHEMA, open_usage_store, usage_row
from tokenworks.metering.usage import Usage, UsageRecord

INT64_MAX = 2**63 - 1


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        yield from _pg_schema_url()


def _usage(request_id: str, account_id: int, input_tokens: int = 10) -> tuple[Any, ...]:
    record = UsageRecord(
        request_id=request_id, ts_ms=1, key_id="k", account_id=str(account_id),
        public_model="m", producer="p", upstream_model="m", endpoint="chat", status=200,
        usage=Usage(input_tokens=input_tokens, output_tokens=5), latency_ms=1.0,
        ttft_ms=None, streamed=False,
    )  # fmt: skip
    return usage_row(record)


async def _stored_usage_ids(L: Ledger) -> set[str]:
    store: Any = L.store
    if store.dialect == "sqlite":
        rows = await store._run(store._all, "SELECT request_id FROM usage")
    else:
        rows = await store._all("SELECT request_id FROM usage")
    return {r[0] for r in rows}


async def _settle_many(L: Ledger, payer: int, ids: list[str]) -> list[Any]:
    for rid in ids:
        await L.hold([payer], 1_000, request_id=rid)
    return list(
        await asyncio.gather(
            *(L.settle(rid, price_nano=700, cost_nano=300, producer="p", model="m") for rid in ids)
        )
    )


# ---------------------------------------------------------------------- finding 1


def test_a_figure_no_column_can_hold_is_refused_at_attach_and_billing_goes_on(url: str) -> None:
    """A usage row with prompt_tokens 1e19 (> int64) used to ride the batch, fail it five
    times and stop the writer: answered requests never charged, later ones 503."""
    open_usage_store(url).close()

    async def body(L: Ledger, _: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 10**9, idempotency_key="top")
        ids = [f"r{i}" for i in range(20)]
        for rid in ids:
            assert L.attach("usage", USAGE_SCHEMA, _usage(rid, org))
        assert not L.attach("usage", USAGE_SCHEMA, _usage("absurd", org, input_tokens=10**19))
        settled = await _settle_many(L, org, ids)
        assert [h.status for h in settled] == ["settled"] * 20
        assert L.writer.failure is None and L.writer.refused_rows == 1
        assert await _stored_usage_ids(L) == set(ids)
        await L.hold([org], 10, request_id="later")  # billing goes on
        assert await L.check() == []

    run(with_ledger(url, body))


def test_a_row_the_store_refuses_fails_alone(url: str) -> None:
    """A row that passes the attach check but that the store refuses (NULL or NaN in a NOT
    NULL column) is found by halving the batch and dropped; everything else commits."""
    open_usage_store(url).close()

    async def body(L: Ledger, _: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 10**9, idempotency_key="top")
        ids = [f"r{i}" for i in range(40)]
        bad = {"r7", "r31"}
        for rid in ids:
            row = list(_usage(rid, org))
            if rid == "r7":
                row[USAGE_SCHEMA.index(("input_tokens", "BIGINT"))] = None
            if rid == "r31":  # NULL in SQLite, null in PostgreSQL's JSON: NOT NULL either way
                row[USAGE_SCHEMA.index(("latency_ms", "DOUBLE PRECISION"))] = float("nan")
            assert L.attach("usage", USAGE_SCHEMA, tuple(row))  # one batch: none awaited yet
        settled = await _settle_many(L, org, ids)
        assert all(h.status == "settled" for h in settled)
        revenue = L.engine.operator_account(AccountKind.REVENUE)
        assert revenue.balance_nano == 700 * len(ids)
        assert L.writer.failure is None and L.writer.refused_rows == len(bad)
        assert await _stored_usage_ids(L) == set(ids) - bad
        assert await L.check() == []

    run(with_ledger(url, body))


def test_the_store_tells_a_refused_value_from_being_unavailable(url: str) -> None:
    async def body(L: Ledger, _: Clock) -> None:
        store: Any = L.store
        assert not store.refuses(OSError("connection reset"))
        assert not store.refuses(TimeoutError())
        assert store.refuses(OverflowError("int too large"))
        if store.dialect == "postgres":
            import asyncpg

            assert store.refuses(asyncpg.exceptions.NumericValueOutOfRangeError("out of range"))
            assert store.refuses(asyncpg.exceptions.NotNullViolationError("null"))
            assert not store.refuses(asyncpg.exceptions.AdminShutdownError("shutdown"))
            assert not store.refuses(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
        else:
            import sqlite3

            assert store.refuses(sqlite3.IntegrityError("NOT NULL"))
            assert not store.refuses(sqlite3.OperationalError("disk I/O error"))

    run(with_ledger(url, body))


def test_an_unavailable_store_still_fails_closed(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenworks.ledger import writer

    monkeypatch.setattr(writer, "RETRY_BASE_S", 0.001)

    async def body(L: Ledger, _: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        await L.hold([org], 100, request_id="r")
        calls = 0

        async def down(batch: object, attached: object = ()) -> None:
            nonlocal calls
            calls += 1
            raise ConnectionResetError("store went away")

        monkeypatch.setattr(L.store, "write", down)
        with pytest.raises(StoreUnavailable):
            await L.settle("r", price_nano=50, cost_nano=0, producer="p", model="m")
        assert calls == writer.WRITE_RETRIES  # retried, not isolated
        violations = await L.check()
        assert any("store not compared" in v for v in violations)

    run(with_ledger(url, body))


# ---------------------------------------------------------------------- finding 2


def test_totals_past_int64_are_exact_in_the_store_and_across_a_restart(url: str) -> None:
    """Each top-up may be 2**62; their sum is not bounded. Balances (and the operator's
    lifetime totals) pass int64 and stay exact; retried keys after a restart move nothing."""
    big = MAX_AMOUNT_NANO
    clock = Clock(START)
    keys = [f"top-{i}" for i in range(3)]

    async def first(L: Ledger, _: Clock) -> tuple[int, list[int]]:
        org, _, user = await org_tree(L)
        transfer_ids = [await L.top_up(org, big, idempotency_key=k) for k in keys]
        assert L.balance(org).balance_nano == 3 * big > INT64_MAX
        # Costs accrue per (producer, model) per commit: three of 2**62 in one batch.
        ids = [f"r{i}" for i in range(3)]
        for rid in ids:
            await L.hold([user], big, request_id=rid)
        await asyncio.gather(
            *(L.settle(r, price_nano=big, cost_nano=big, producer="p", model="m") for r in ids)
        )
        assert L.engine.operator_account(AccountKind.EXPENSE).balance_nano == -3 * big
        assert L.writer.failure is None
        assert await L.check() == [] and L.store_compared
        statement = await L.statement(
            org, datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
        )
        assert statement["closing_nano"] == 0
        return org, transfer_ids

    org, transfer_ids = run(with_ledger(url, first, clock))

    async def after(L: Ledger, _: Clock) -> None:
        assert L.balance(org).balance_nano == 0
        assert L.engine.operator_account(AccountKind.TOPUPS).balance_nano == -3 * big
        assert L.engine.operator_account(AccountKind.REVENUE).balance_nano == 3 * big
        for key, tid in zip(keys, transfer_ids, strict=True):  # retries after a restart
            assert await L.top_up(org, big, idempotency_key=key) == tid
        assert L.engine.operator_account(AccountKind.TOPUPS).balance_nano == -3 * big
        await L.top_up(org, big, idempotency_key="top-3")
        assert await L.check() == []

    run(with_ledger(url, after, clock))


def test_a_ledger_from_before_wide_totals_opens_and_takes_them(url: str) -> None:
    """An existing database whose balance columns are BIGINT is upgraded when it opens."""

    async def older(L: Ledger, _: Clock) -> int:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 5, idempotency_key="t0")
        store: Any = L.store
        if store.dialect == "postgres":
            async with store._pool.acquire() as c:
                await c.execute(
                    "ALTER TABLE ledger_accounts ALTER COLUMN balance_nano TYPE BIGINT;"
                    "ALTER TABLE ledger_buckets ALTER COLUMN remaining_nano TYPE BIGINT"
                )
        return org

    org = run(with_ledger(url, older))

    async def newer(L: Ledger, _: Clock) -> None:
        assert L.balance(org).balance_nano == 5
        for i in range(3):
            await L.top_up(org, MAX_AMOUNT_NANO, idempotency_key=f"t{i + 1}")
        assert await L.check() == []

    run(with_ledger(url, newer))

    async def reopened(L: Ledger, _: Clock) -> None:
        assert L.balance(org).balance_nano == 5 + 3 * MAX_AMOUNT_NANO

    run(with_ledger(url, reopened))


# ---------------------------------------------------------------------- finding 3


def test_check_compares_the_store_under_steady_traffic(url: str) -> None:
    """Traffic that never pauses used to make check() skip the store and still pass."""

    async def body(L: Ledger, _: Clock) -> None:
        org, _, user = await org_tree(L)
        await L.top_up(org, 10**15, idempotency_key="top")
        done = asyncio.Event()
        served = 0

        async def traffic(worker: int) -> None:
            nonlocal served
            deadline = time.monotonic() + 60
            for i in range(200_000):  # bounded in count and time
                if done.is_set() or time.monotonic() > deadline:
                    return
                rid = f"w{worker}-{i}"
                await L.hold([user], 100, request_id=rid)
                await L.settle(rid, price_nano=60, cost_nano=20, producer="p", model="m")
                served += 1

        workers = [asyncio.create_task(traffic(w)) for w in range(8)]
        try:
            while served < 50:
                await asyncio.sleep(0.01)
            for _ in range(3):
                before = served
                assert await L.check() == []
                assert L.store_compared
                assert served > before  # traffic ran during the check
        finally:
            done.set()
            await asyncio.gather(*workers)
        assert await L.check() == [] and L.store_compared

    run(with_ledger(url, body))


# ---------------------------------------------------------------------- finding 5


def test_concurrent_hammer_keeps_every_invariant(url: str) -> None:
    """Many tasks at once: holds, settles, voids, top-ups (past int64 in total), transfers and
    checks, interleaved; every invariant holds at the end, in memory and in the store."""

    async def body(L: Ledger, clock: Clock) -> None:
        org, team, user = await org_tree(L)
        agents = [
            (await L.create_account(f"a{i}", user, "agent", idempotency_key=f"a{i}")).id
            for i in range(4)
        ]
        await L.set_budget(team, 10**12, "day", idempotency_key="b-team")
        rnd = random.Random(8)
        settled: list[int] = []
        topped: list[int] = []
        checks: list[list[str]] = []

        await L.top_up(org, 1_000_000, idempotency_key="base")

        async def request(i: int) -> None:
            await asyncio.sleep(rnd.random() / 100)  # interleaved with the money and checks
            payer = rnd.choice(agents)
            amount = rnd.randint(1, 5_000)
            try:
                await L.hold([payer], amount, request_id=f"r{i}", ttl_s=30)
            except Refused:
                return
            await asyncio.sleep(rnd.random() / 1000)
            if rnd.random() < 0.8:
                h = await L.settle(
                    f"r{i}", price_nano=rnd.randint(0, amount), cost_nano=rnd.randint(0, 9),
                    producer=rnd.choice("pq"), model="m",
                )  # fmt: skip
                settled.append(h.price_nano)
            else:
                await L.void(f"r{i}")

        async def money(i: int) -> None:
            if i % 3 == 0:
                await L.top_up(org, MAX_AMOUNT_NANO, idempotency_key=f"big{i}")
                topped.append(MAX_AMOUNT_NANO)
            elif i % 3 == 1:
                await L.top_up(team, 7_000, idempotency_key=f"t{i}")
                topped.append(7_000)
            else:
                with contextlib.suppress(Refused):
                    await L.transfer(org, team, 3_000, idempotency_key=f"x{i}", actor="operator")

        async def check(_: int) -> None:
            checks.append(await L.check())

        jobs = [request(i) for i in range(800)]
        jobs += [money(i) for i in range(60)]
        jobs += [check(i) for i in range(4)]
        rnd.shuffle(jobs)
        await asyncio.gather(*jobs)
        assert checks == [[]] * 4 and L.store_compared
        revenue = L.engine.operator_account(AccountKind.REVENUE).balance_nano
        assert revenue == sum(settled) and settled
        topups = -L.engine.operator_account(AccountKind.TOPUPS).balance_nano
        assert topups == 1_000_000 + sum(topped)
        assert sum(topped) > INT64_MAX
        assert await L.check() == []

    run(with_ledger(url, body))


# ---------------------------------------------------------------------- finding 4


def test_back_dating_and_times_are_bounded(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        org, _, _ = await org_tree(L)
        with pytest.raises(InvalidRequest, match="between 1970 and 9999"):
            await L.grant(
                org, 1, idempotency_key="g1500", recurring=Recurrence(Period.DAY),
                effective_at=datetime(1500, 1, 1, tzinfo=UTC),
            )  # fmt: skip
        # 1990, daily: 13,000 periods to issue on the event loop. Refused up front.
        with pytest.raises(InvalidRequest, match="effective_at may be at most 400 days"):
            await L.grant(
                org, 1, idempotency_key="g1990", recurring=Recurrence(Period.DAY),
                effective_at=datetime(1990, 1, 1, tzinfo=UTC),
            )  # fmt: skip
        assert L.engine.grants == {}
        # A year back is fine, and its periods are issued.
        await L.grant(
            org, 1, idempotency_key="g-year", recurring=Recurrence(Period.MONTH),
            effective_at=START - timedelta(days=365),
        )  # fmt: skip
        with pytest.raises(InvalidRequest):
            await L.delegate("p", "c", 1, idempotency_key="d", ttl_s=1e300)
        assert await L.check() == []

    run(with_ledger(url, body))


def test_changing_a_budgets_zone_applies_it(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        org, _, _ = await org_tree(L)
        first = await L.set_budget(org, 1_000, "day", idempotency_key="b1")
        assert first["tz"] == "UTC"
        changed = await L.set_budget(org, 1_000, "day", idempotency_key="b2", tz="Asia/Tokyo")
        assert changed["tz"] == "Asia/Tokyo"
        # The day now ends at Tokyo midnight (15:00 UTC), not UTC midnight.
        assert changed["period_end_ms"] % 86_400_000 == 15 * 3_600_000
        assert changed["period_start_ms"] == first["period_start_ms"]
        assert await L.check() == []

    run(with_ledger(url, body))

    async def reopened(L: Ledger, _: Clock) -> None:
        org = next(a.id for a in L.engine.accounts.values() if a.name == "acme")
        assert [b["tz"] for b in L.budgets(org)] == ["Asia/Tokyo"]

    run(with_ledger(url, reopened))
