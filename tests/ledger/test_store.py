"""The ledger over real stores: the same tests against SQLite and PostgreSQL.

PostgreSQL tests skip loudly when no server answers at TOKENWORKS_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/test), and fail instead when CI=true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tokenworks.ledger import (
    AccountKind,
    HoldClosed,
    IdempotencyConflict,
    Ledger,
    LedgerError,
    NotFound,
    Period,
    Recurrence,
    Refused,
    Rollover,
    auditor,
)
from tokenworks.ledger.store import AuditReader

PG_URL = os.environ.get("TOKENWORKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _pg_up() -> bool:
    import asyncpg

    async def probe() -> None:
        c = await asyncpg.connect(PG_URL, timeout=3)
        await c.close()

    try:
        run(probe())
        return True
    except Exception:
        return False


_PG: bool | None = None


def _pg_schema_url() -> Iterator[str]:
    global _PG
    if _PG is None:
        _PG = _pg_up()
    if not _PG:
        reason = f"POSTGRESQL NOT REACHABLE AT {PG_URL}: LEDGER POSTGRES TESTS DID NOT RUN"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true requires it)")
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    schema = f"ledger_t_{uuid.uuid4().hex[:12]}"
    yield f"{PG_URL}?schema={schema}"

    async def drop() -> None:
        import asyncpg

        c = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await c.close()

    run(drop())


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        yield from _pg_schema_url()


class Clock:
    def __init__(self, start: datetime) -> None:
        self.t = start.timestamp()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


async def with_ledger(
    url: str, fn: Callable[[Ledger, Clock], Awaitable[T]], clock: Clock | None = None
) -> T:
    clock = clock or Clock(START)
    ledger = await Ledger.open(url, clock=clock, sweep_interval_s=None)
    try:
        return await fn(ledger, clock)
    finally:
        await ledger.close()


async def org_tree(L: Ledger, prefix: str = "") -> tuple[int, int, int]:
    org = await L.create_account("acme", None, "organisation", idempotency_key=prefix + "org")
    team = await L.create_account("eng", org.id, "team", idempotency_key=prefix + "team")
    user = await L.create_account("ann", team.id, "user", idempotency_key=prefix + "user")
    return org.id, team.id, user.id


# ---------------------------------------------------------------------- idempotency


def test_every_write_is_idempotent_including_across_restarts(url: str) -> None:
    clock = Clock(START)

    async def writes(L: Ledger) -> dict[str, Any]:
        org, team, user = await org_tree(L)
        out: dict[str, Any] = {"ids": (org, team, user)}
        out["top_up"] = await L.top_up(org, 10_000, idempotency_key="top")
        out["grant"] = await L.grant(
            user,
            500,
            idempotency_key="grant",
            recurring=Recurrence(Period.MONTH, "Europe/Paris"),
            rollover=Rollover.up_to(200),
            priority=1,
        )
        out["transfer"] = await L.transfer(
            org, team, 1_000, idempotency_key="xfer", actor="operator"
        )
        out["budget"] = (await L.set_budget(user, 5_000, "month", idempotency_key="bud"))[
            "limit_nano"
        ]
        await L.set_budget(("key", "p"), 4_000, "total", idempotency_key="kbud")
        out["delegate"] = (await L.delegate("p", "c", 1_000, idempotency_key="del"))["scope"]
        out["revoke"] = await L.revoke(("key", "c"), idempotency_key="rev")
        h = await L.hold([org, team, user], 700, request_id="req-1", key_scopes=["p"])
        out["hold"] = (h.id, h.amount_nano)
        s = await L.settle("req-1", price_nano=600, cost_nano=300, producer="x", model="m")
        out["settle"] = (s.status, s.price_nano)
        await L.hold([user], 50, request_id="req-2")
        out["void"] = (await L.void("req-2")).status
        return out

    async def balances(L: Ledger, ids: tuple[int, int, int]) -> list[int]:
        return [L.balance(i).balance_nano for i in ids]

    async def first(L: Ledger, _: Clock) -> tuple[dict[str, Any], list[int]]:
        out = await writes(L)
        again = await writes(L)  # the same keys, same bodies: same results, no effect
        assert again == out
        return out, await balances(L, out["ids"])

    out, bal = run(with_ledger(url, first, clock))
    assert bal == [9_000, 900, 0]  # the grant paid 500 of 600, the team (next up) 100

    async def after_restart(L: Ledger, _: Clock) -> None:
        assert await writes(L) == out  # answered from the store's memory
        assert await balances(L, out["ids"]) == bal
        org = out["ids"][0]
        with pytest.raises(IdempotencyConflict):
            await L.top_up(org, 10_001, idempotency_key="top")
        with pytest.raises(IdempotencyConflict):
            await L.settle("req-1", price_nano=601, cost_nano=300, producer="x", model="m")
        with pytest.raises(IdempotencyConflict):
            await L.hold([org], 1, request_id="req-1")
        with pytest.raises(HoldClosed):
            await L.settle("req-2", price_nano=1, cost_nano=0, producer="x", model="m")
        assert await L.check() == []

    run(with_ledger(url, after_restart, clock))


# ---------------------------------------------------------------------- concurrency


def test_async_hammer_holds_every_limit(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        org, team, user = await org_tree(L)
        agents = [
            (await L.create_account(f"agent{i}", user, "agent", idempotency_key=f"ag{i}")).id
            for i in range(5)
        ]
        await L.top_up(org, 120_000, idempotency_key="top")
        await L.grant(agents[0], 3_000, idempotency_key="g0", priority=0)
        await L.set_budget(team, 90_000, "day", idempotency_key="b-team")
        for i, a in enumerate(agents):
            await L.set_budget(a, 15_000, "total", idempotency_key=f"b-a{i}")
        await L.set_budget(("key", "k-main"), 60_000, "month", idempotency_key="b-key")
        await L.delegate("k-main", "k-sub", 8_000, idempotency_key="d-sub", ttl_s=3600)
        rnd = random.Random(7)
        refusals: list[str] = []
        settled: list[int] = []

        async def request(i: int) -> None:
            agent = rnd.choice(agents)
            key = rnd.choice(["k-main", "k-sub"])
            amount = rnd.randint(100, 2_500)
            try:
                await L.hold([agent], amount, request_id=f"r{i}", key_scopes=[key], ttl_s=30)
            except Refused as e:
                refusals.append(e.limit_kind)
                return
            await asyncio.sleep(rnd.random() / 500)
            roll = rnd.random()
            if roll < 0.75:
                price = rnd.randint(0, amount + 200)  # sometimes above the hold: clamped
                h = await L.settle(
                    f"r{i}", price_nano=price, cost_nano=price // 3, producer="p", model="m"
                )
                settled.append(h.price_nano)
            elif roll < 0.9:
                await L.void(f"r{i}")
            # else: abandoned, left to expire

        await asyncio.gather(*(request(i) for i in range(600)))
        assert refusals and settled, "limits never bit, or nothing settled"
        for scope in [team, *agents, ("key", "k-main"), ("key", "k-sub")]:
            for b in L.budgets(scope):
                assert b["spent_nano"] + b["held_nano"] + b["delegated_nano"] <= b["limit_nano"]
        assert L.engine.operator_account(AccountKind.REVENUE).balance_nano == sum(settled)
        assert L.balance(org).balance_nano + L.balance(agents[0]).balance_nano == (
            123_000 - sum(settled)
        )
        assert await L.check() == []
        clock.advance(31)
        swept = await L.sweep_expired()
        assert L.engine.holds == {}
        assert swept["holds_expired"] > 0
        assert await L.check() == []

    run(with_ledger(url, body))


def test_refusal_for_credit_and_budget_names_the_account(url: str) -> None:
    async def body(L: Ledger, _: Clock) -> None:
        org, team, user = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        await L.set_budget(team, 600, "week", idempotency_key="b")
        with pytest.raises(Refused) as e:
            await L.hold([org, team, user], 700, request_id="r1")
        assert (e.value.account_id, e.value.limit_kind) == (team, "budget:week")
        await L.set_budget(team, 5_000, "week", idempotency_key="b2")
        with pytest.raises(Refused) as e:
            await L.hold([user], 1_001, request_id="r2")
        assert (e.value.account_id, e.value.limit_kind) == (org, "credit")
        assert e.value.available_nano == 1_000
        h = await L.hold([user], 400, request_id="r3")
        assert h.available_after_nano == 600 == L.balance(user).chain_available_nano

    run(with_ledger(url, body))


# ---------------------------------------------------------------------- grants & statements


def test_statement_and_expiry_through_the_store(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        org, _team, user = await org_tree(L)
        await L.top_up(org, 5_000, idempotency_key="top")
        await L.grant(
            user,
            1_000,
            idempotency_key="g",
            recurring=Recurrence(Period.DAY),
            rollover=Rollover.up_to(300),
        )
        await L.hold([user], 900, request_id="a")
        await L.settle("a", price_nano=600, cost_nano=200, producer="p", model="model-a")
        clock.advance(86_400)  # next day: 300 carried, 100 expired, 1,000 refilled
        await L.sweep_expired()
        assert L.balance(user).balance_nano == 1_300
        await L.hold([user], 1_500, request_id="b")
        await L.settle("b", price_nano=1_500, cost_nano=700, producer="p", model="model-b")
        since, until = START - timedelta(hours=1), START + timedelta(days=2)
        st = await L.statement(user, since, until)
        assert st["opening_nano"] == 0
        assert st["grants_nano"] == 2_000
        assert st["expired_nano"] == 100
        assert st["spend_nano"] == 600 + 1_300
        assert st["spend_by_model"] == {
            "model-a": {"spend_nano": 600, "requests": 1},
            "model-b": {"spend_nano": 1_300, "requests": 1},
        }
        assert st["closing_nano"] == 0 == L.balance(user).balance_nano
        org_st = await L.statement(org, since, until)
        assert org_st["spend_nano"] == 200 and org_st["closing_nano"] == 4_800
        csv = await L.statement_csv(user, since, until)
        assert "spend,model-b,1300,0.0000013,1" in csv
        later = await L.statement(user, START + timedelta(hours=13), until)  # after the refill
        assert later["opening_nano"] == 1_300 and later["closing_nano"] == 0
        assert await L.check() == []

    run(with_ledger(url, body))


def test_a_restart_frees_what_open_holds_reserved(url: str) -> None:
    """Open holds are never written: a restart rebuilds with nothing held, expires what an
    ended grant kept only for them, and derives a parent's delegated room afresh."""
    clock = Clock(START)
    ids: dict[str, int] = {}

    async def before(L: Ledger, clock: Clock) -> None:
        org, _team, user = await org_tree(L)
        ids.update(org=org, user=user)
        await L.top_up(org, 10_000, idempotency_key="top")
        await L.set_budget(("key", "parent"), 5_000, "total", idempotency_key="b")
        await L.delegate("parent", "child", 1_000, idempotency_key="d")
        # 300 on the child key (from the org's cash), then 80 of a grant to the user.
        await L.hold([user], 300, request_id="on-child", key_scopes=["child"])
        await L.grant(user, 100, idempotency_key="g", expires_at=START + timedelta(seconds=10))
        await L.hold([user], 80, request_id="on-grant", key_scopes=["parent"])
        clock.advance(11)
        await L.sweep_expired()  # the grant ends while 80 of it is held: 20 expires now
        assert L.balance(user).balance_nano == 80
        assert L.budgets(("key", "parent"))[0]["delegated_nano"] == 700
        assert await L.check() == []
        await L.flush()  # then the process dies with both holds open

    async def after(L: Ledger, clock: Clock) -> None:
        org, user = ids["org"], ids["user"]
        accounts = {a: L.balance(a) for a in (org, user)}
        assert all(b.held_nano == 0 for b in accounts.values())
        assert accounts[user].balance_nano == 0  # the 80 the ended grant kept expired
        assert accounts[org].balance_nano == 10_000  # nothing was charged
        parent = {b["period"]: b for b in L.budgets(("key", "parent"))}["total"]
        assert (parent["held_nano"], parent["delegated_nano"]) == (0, 1_000)
        child = L.budgets(("key", "child"))[0]
        assert (child["held_nano"], child["spent_nano"]) == (0, 0)
        st = await L.statement(user, START - timedelta(hours=1), START + timedelta(hours=1))
        assert (st["grants_nano"], st["expired_nano"]) == (100, 100), st
        # The child's whole budget can be held again, and the ledger is sound, store included.
        await L.hold([user], 1_000, request_id="again", key_scopes=["child"])
        await L.void("again")
        assert await L.check() == [] and L.store_compared

    run(with_ledger(url, before, clock))
    run(with_ledger(url, after, clock))


def test_rows_survive_the_store_exactly(url: str) -> None:
    """Large amounts, odd names and nulls come back from the store as they went in (the
    PostgreSQL store ships a batch as one JSON document)."""
    big = 2**62 - 7
    model = 'modèle "x"\\n\u4e2d\u6587 \u2603'
    producer = "p'; DROP TABLE ledger_holds; --"

    async def before(L: Ledger, clock: Clock) -> None:
        org, _, user = await org_tree(L, prefix="é ")
        await L.top_up(org, big, idempotency_key="top ☃")
        await L.hold([user], big - 1, request_id=model)
        await L.settle(model, price_nano=big - 3, cost_nano=big - 5, producer=producer, model=model)

    async def after(L: Ledger, clock: Clock) -> None:
        h = await L.settle(
            model, price_nano=big - 3, cost_nano=big - 5, producer=producer, model=model
        )  # a retry, answered from the stored hold
        assert (h.price_nano, h.cost_nano, h.status) == (big - 3, big - 5, "settled")
        org = next(a for a in L.engine.accounts.values() if a.name == "acme")
        assert L.balance(org.id).balance_nano == 3  # big - (big - 3)
        payable = next(a for a in L.engine.accounts.values() if a.name == f"payable:{producer}")
        assert L.balance(payable.id).balance_nano == big - 5
        st = await L.statement(org.id, START - timedelta(hours=1), START + timedelta(hours=1))
        # The user drew on the organisation's credit: the spend is on its statement.
        assert st["spend_by_model"] == {model: {"spend_nano": big - 3, "requests": 1}}
        assert await L.check() == [] and L.store_compared

    run(with_ledger(url, before))
    run(with_ledger(url, after))


async def tamper(L: Ledger, sql: str) -> None:
    """Change the store behind the ledger's back, as a bug or a hand would."""
    store: Any = L.store
    if store.dialect == "sqlite":
        await store._run(store.conn.execute, sql)
    else:
        async with store._pool.acquire() as c:
            await c.execute(sql)


def test_holds_an_earlier_version_stored_open_are_closed_on_open(url: str) -> None:
    """The previous version wrote holds when they opened; a database it left behind after a
    crash has open rows. Opening it closes them: they reserve nothing, and a late settle
    of one is refused rather than charged against a hold with no legs."""

    async def before(L: Ledger, clock: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        await L.hold([org], 100, request_id="done")
        await L.settle("done", price_nano=60, cost_nano=0, producer="p", model="m")
        await L.flush()
        # What the old version would have left: a hold row still open.
        sql = (
            "INSERT INTO ledger_holds (id, status, chain, scopes, amount_nano, created_ms, "
            f"expires_ms, price_nano, cost_nano, clamped_nano) VALUES ('stale', 'open', "
            f"'[{org}]', '[\"account:{org}\"]', 500, 1, 99999999999999, 0, 0, 0)"
        )
        await tamper(L, sql)

    async def after(L: Ledger, clock: Clock) -> None:
        with pytest.raises(HoldClosed):
            await L.settle("stale", price_nano=10, cost_nano=0, producer="p", model="m")
        with pytest.raises(HoldClosed):
            await L.void("stale")
        org = next(a for a in L.engine.accounts.values() if a.name == "acme")
        assert L.balance(org.id).available_nano == 940
        assert await L.check() == [] and L.store_compared

    run(with_ledger(url, before))
    run(with_ledger(url, after))


def test_text_the_store_cannot_hold_is_refused_or_replaced(url: str) -> None:
    """NUL cannot be stored by PostgreSQL: one such value would fail a whole group commit
    (and, past its retries, the ledger). Ledger text is refused at the door; usage text that
    came from outside (an upstream's error message) is replaced."""
    from tokenworks.ledger import InvalidRequest
    from tokenworks.metering.store import USAGE_SCHEMA, open_usage_store, usage_row
    from tokenworks.metering.usage import Usage, UsageRecord

    open_usage_store(url).close()

    async def body(L: Ledger, clock: Clock) -> None:
        with pytest.raises(InvalidRequest):
            await L.create_account("a\x00b", None, "organisation", idempotency_key="k")
        with pytest.raises(InvalidRequest):
            await L.create_account("ok", None, "organisation", idempotency_key="k\x00")
        org, _, _ = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        with pytest.raises(InvalidRequest):
            await L.hold([org], 10, request_id="r\x00")
        await L.hold([org], 10, request_id="r")
        with pytest.raises(InvalidRequest):
            await L.settle("r", price_nano=5, cost_nano=0, producer="p\x00", model="m")
        await L.settle("r", price_nano=5, cost_nano=0, producer="p", model="m")
        record = UsageRecord(
            request_id="r", ts_ms=1, key_id=None, account_id=str(org), public_model="m",
            producer="p", upstream_model="m", endpoint="chat", status=502, usage=Usage(),
            latency_ms=1.0, ttft_ms=None, streamed=False, error="upstream said \x00oops",
        )  # fmt: skip
        row = usage_row(record)
        assert row[USAGE_SCHEMA.index(("error", "TEXT"))] == "upstream said \ufffdoops"
        assert L.attach("usage", USAGE_SCHEMA, row)
        await L.flush()  # committed: the ledger did not fail
        await L.top_up(org, 1, idempotency_key="after")
        assert await L.check() == []

    run(with_ledger(url, body))


def test_check_sees_a_tampered_store(url: str) -> None:
    async def body(L: Ledger, _: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        for i, cost in enumerate((30, 40, 0)):  # costs accrue, posted once per commit
            await L.hold([org], 100, request_id=f"r{i}")
            await L.settle(f"r{i}", price_nano=50, cost_nano=cost, producer="p", model="m")
        assert await L.check() == []
        await tamper(
            L, f"UPDATE ledger_accounts SET balance_nano = balance_nano + 1 WHERE id = {org}"
        )
        await tamper(L, "UPDATE ledger_holds SET cost_nano = 31 WHERE id = 'r0'")
        v = await L.check()
        assert any("sum of balances" in x for x in v)
        assert any(f"store account {org}" in x for x in v)
        assert any("costs posted 70 != settled holds' 71" in x for x in v), v

    run(with_ledger(url, body))


def test_check_reads_the_store_a_bounded_chunk_at_a_time(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit never holds more than `chunk_rows` per-account or per-bucket rows at once
    (a fetch of every row holds the GIL, and so the event loop, while it builds them all),
    and a tampered row is still found wherever its chunk falls."""
    taken: list[tuple[str, int]] = []
    real_take = AuditReader.take

    def take(self: AuditReader, name: str, chunk: Any) -> None:
        taken.append((name, len(chunk)))
        real_take(self, name, chunk)

    monkeypatch.setattr(AuditReader, "chunk_rows", 2)
    monkeypatch.setattr(AuditReader, "take", take)
    monkeypatch.setattr(auditor, "AUDIT_CHUNK_ROWS", 2)  # the engine's figures as dicts

    async def body(L: Ledger, _: Clock) -> None:
        orgs = []
        for i in range(7):
            org = await L.create_account(f"o{i}", None, "organisation", idempotency_key=f"o{i}")
            await L.top_up(org.id, 1_000 + i, idempotency_key=f"t{i}")
            await L.grant(org.id, 10 + i, idempotency_key=f"g{i}")
            orgs.append(org.id)
        assert await L.check() == []
        n_accounts, n_buckets = len(L.engine.accounts), len(L.engine.buckets)
        assert max(n for _, n in taken) <= 2
        assert sum(n for name, n in taken if name == "accounts") == n_accounts
        assert sum(n for name, n in taken if name == "buckets") == n_buckets
        first, last = orgs[0], orgs[-1]
        await tamper(
            L, f"UPDATE ledger_accounts SET balance_nano = balance_nano + 1 WHERE id = {last}"
        )
        await tamper(L, f"UPDATE ledger_account_periods SET net_nano = net_nano + 2 "
                     f"WHERE account_id = {first}")  # fmt: skip
        bucket = max(L.engine.buckets)
        await tamper(L, f"UPDATE ledger_buckets SET remaining_nano = remaining_nano + 3 "
                     f"WHERE id = {bucket}")  # fmt: skip
        v = await L.check()
        balance = L.engine.accounts[last].balance_nano
        remaining = L.engine.buckets[bucket].remaining_nano
        assert f"store account {last}: balance {balance + 1} != transfers {balance}" in v, v
        assert f"store account {last}: {balance + 1} != engine {balance}" in v, v
        assert "store: sum of balances is 1, not 0" in v, v
        net = L.engine.accounts[first].balance_nano
        assert f"store account {first}: period nets {net + 2} != transfers {net}" in v, v
        assert any(x.startswith(f"store account {first}: week of") for x in v), v
        assert f"store bucket {bucket}: {remaining + 3} != transfers {remaining}" in v, v
        assert f"store bucket {bucket}: {remaining + 3} != engine" in v, v

    run(with_ledger(url, body))


def test_the_audits_columns_start_old_for_the_collector() -> None:
    """The collector's young passes walk every element of a young list, the GIL held (a
    pass over 200,000 figures took 100-200 ms under load): the columns the audit grows to a
    figure per account or bucket are made old while empty."""

    def young() -> set[int]:
        return {id(o) for o in gc.get_objects(0)} | {id(o) for o in gc.get_objects(1)}

    small: dict[str, list[tuple[Any, ...]]] = {
        "weeks": [], "unbalanced_weeks": [], "mischarged": [], "open_holds": [],
        "orphan_spend": [(None, None, None)], "bad_transfers": [(0,)],
        "costs": [(None, None, None)], "horizon": [(0, 0)],
    }  # fmt: skip
    audit = AuditReader(small).data
    names = [f.name for f in dataclasses.fields(audit) if f.name.startswith(("account", "bucket"))]
    grown = [getattr(audit, n) for n in names]
    assert len(grown) == 8
    assert not {id(c) for c in grown} & young()


def test_the_check_lets_its_columns_go_on_its_thread(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's and the audit's lists are emptied on the check's thread once compared:
    dropped on the loop, the last reference frees every figure in one GIL-holding call."""
    seen: list[tuple[bool, list[list[Any]]]] = []
    real = auditor.let_go

    def let_go(cut: Any, audit: Any) -> None:
        cols = [c for c in [*cut.facts, audit.account_ids, audit.bucket_nets] if type(c) is list]
        seen.append((threading.current_thread() is threading.main_thread(), cols))
        real(cut, audit)

    monkeypatch.setattr(auditor, "let_go", let_go)
    monkeypatch.setattr(auditor, "AUDIT_CHUNK_ROWS", 2)

    async def body(L: Ledger, _: Clock) -> None:
        for i in range(5):
            org = await L.create_account(f"o{i}", None, "organisation", idempotency_key=f"o{i}")
            await L.grant(org.id, 10 + i, idempotency_key=f"g{i}")
        assert await L.check() == []

    run(with_ledger(url, body))
    [(on_loop, cols)] = seen
    assert not on_loop
    assert len(cols) >= 12 and not any(cols)


def test_engine_figures_are_taken_a_chunk_at_a_time_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auditor, "AUDIT_CHUNK_ROWS", 3)
    keys, values = list(range(10, 0, -1)), [k * 7 for k in range(10)]
    assert auditor.chunked_dict(keys, values) == dict(zip(keys, values, strict=True))
    assert auditor.chunked_dict([], []) == {}
    with pytest.raises(ValueError):
        auditor.chunked_dict(keys, values[:-1])


def test_a_second_process_cannot_open_the_same_ledger(url: str) -> None:
    async def body(L: Ledger, _: Clock) -> None:
        with pytest.raises(LedgerError):
            await Ledger.open(url, sweep_interval_s=None)

    # flock and advisory locks are per file description / session: this process's second
    # open is refused just like another process's would be.
    run(with_ledger(url, body))


# ---------------------------------------------------------------------- crash recovery

CHILD = textwrap.dedent(
    """
    import asyncio, sys, random
    from tokenworks.ledger import Ledger, Refused

    async def main(url):
        L = await Ledger.open(url, sweep_interval_s=None)
        org = await L.create_account("acme", None, "organisation", idempotency_key="org")
        user = await L.create_account("ann", org.id, "user", idempotency_key="user")
        await L.top_up(org.id, 10**12, idempotency_key="top")
        await L.set_budget(user.id, 10**11, "day", idempotency_key="bud")
        print("READY", org.id, user.id, flush=True)
        rnd = random.Random(1)

        async def one(i):
            rid = f"r{i}"
            amount = rnd.randint(1_000, 9_000)
            await L.hold([user.id], amount, request_id=rid, ttl_s=30)
            await asyncio.sleep(0)
            if i % 5 == 0:
                return  # left open: the crash strands it, the sweep must free it
            price = rnd.randint(1, amount)
            await L.settle(rid, price_nano=price, cost_nano=price // 2, producer="p", model="m")
            print("SETTLED", rid, price, flush=True)

        i = 0
        while True:
            await asyncio.gather(*(one(i + j) for j in range(50)))
            i += 50

    asyncio.run(main(sys.argv[1]))
    """
)


def test_crash_mid_load_leaves_no_double_charge_and_no_stranded_hold(url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    settled: dict[str, int] = {}
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "READY", proc.stderr.read() if proc.stderr else ""
        org, user = int(ready[1]), int(ready[2])
        while len(settled) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline().split()
            assert line, "child died"
            settled[line[1]] = int(line[2])
        os.kill(proc.pid, signal.SIGKILL)  # mid-load: holds and settlements in flight
    finally:
        proc.kill()
        proc.wait()
    assert len(settled) >= 400

    clock = Clock(datetime.now(UTC))

    async def recover(L: Ledger, clock: Clock) -> None:
        # Every acknowledged settlement survived, exactly once.
        for rid, price in settled.items():
            h = await L.settle(rid, price_nano=price, cost_nano=price // 2, producer="p", model="m")
            assert (h.status, h.price_nano) == ("settled", price)
        spent = 10**12 - L.balance(org).balance_nano
        assert spent >= sum(settled.values())  # more may have committed unacknowledged
        assert L.balance(user).balance_nano == 0
        # Holds die with their process: nothing is held after the restart, and a hold the
        # crash left open ("r0" was never settled) can no longer be charged.
        assert L.engine.holds == {}
        assert L.balance(org).held_nano == 0
        with pytest.raises(NotFound):
            await L.settle("r0", price_nano=1, cost_nano=0, producer="p", model="m")
        assert await L.check() == []  # includes: each settled hold's postings == its price
        clock.advance(31)
        await L.sweep_expired()
        assert 10**12 - L.balance(org).balance_nano == spent  # the sweep charged nothing
        assert await L.check() == []

    run(with_ledger(url, recover, clock))


def test_a_failing_store_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenworks.ledger import StoreUnavailable, writer

    monkeypatch.setattr(writer, "RETRY_BASE_S", 0.001)

    async def body(L: Ledger, _: Clock) -> None:
        org, _, _ = await org_tree(L)
        await L.top_up(org, 1_000, idempotency_key="top")
        await L.hold([org], 100, request_id="r")

        async def broken(batch: object, attached: object = ()) -> None:
            raise OSError("disk gone")

        monkeypatch.setattr(L.store, "write", broken)
        with pytest.raises(StoreUnavailable):
            await L.settle("r", price_nano=50, cost_nano=0, producer="p", model="m")
        with pytest.raises(StoreUnavailable):  # no more holds once settlements cannot persist
            await L.hold([org], 1, request_id="r2")

    run(with_ledger(f"sqlite:///{tmp_path}/l.db", body))
