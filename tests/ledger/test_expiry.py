"""Old ledger transfers deleted past the retention horizon, on SQLite and PostgreSQL: check()
still passes (and still catches a wrong sum), paying traffic goes on meanwhile, a failed
deletion loses nothing, statements before the horizon are refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.ledger.test_compaction import _sql, _traffic
from tests.ledger.test_store import START, Clock, org_tree, run, url, with_ledger
from tokenworks.api.errors import api_error
from tokenworks.config import Retention
from tokenworks.db import backend
from tokenworks.ledger import BeforeHorizon, Ledger, Period, Recurrence
from tokenworks.ledger import expiry as expiry_module
from tokenworks.ledger.expiry import TransferExpiry
from tokenworks.ledger.schema import HORIZON_KEY, PERIOD_MS
from tokenworks.retention import run_once

DAY_S = 86_400
POLICY = Retention(holds_days=35, transfers_days=40, batch_rows=100)
__all__ = ["url"]  # the fixture: both stores


async def _history(L: Ledger, clock: Clock) -> list[int]:
    """Ten weeks of paying traffic, weekly grant refills and expiries, then 30 quiet days."""
    org, _team, user = await org_tree(L)
    agents = [
        (await L.create_account(f"agent{i}", user, "agent", idempotency_key=f"ag{i}")).id
        for i in range(4)
    ]
    await L.top_up(org, 10**9, idempotency_key="top")
    await L.grant(user, 10**5, idempotency_key="weekly", recurring=Recurrence(Period.WEEK))
    await L.set_budget(agents[0], 10**8, "total", idempotency_key="b-a0")
    for week in range(10):
        await _traffic(L, agents, f"w{week}-", 40, seed=week)
        clock.advance(7 * DAY_S)
        await L.sweep_expired()
    clock.advance(30 * DAY_S)
    await L.sweep_expired()
    await L.flush()
    return agents


def _count(url: str, where: str = "") -> int:
    return int(_sql(url, f"SELECT COUNT(*) FROM ledger_transfers {where}")[0][0])


def _dropped(url: str) -> int:
    return int(_sql(url, "SELECT COALESCE(SUM(transfers), 0) FROM ledger_transfers_dropped")[0][0])


def _horizon(url: str) -> int:
    rows = _sql(url, f"SELECT v FROM ledger_meta WHERE k = '{HORIZON_KEY}'")
    return int(rows[0][0]) if rows else 0


def _balances_from_periods(url: str) -> dict[int, int]:
    rows = _sql(
        url,
        "SELECT a.id, a.balance_nano, (SELECT SUM(net_nano) FROM ledger_account_periods p"
        " WHERE p.account_id = a.id) FROM ledger_accounts a",
    )
    return {int(i): int(b) - int(s or 0) for i, b, s in rows}


def test_deleting_old_transfers_under_load_keeps_check_clean(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        agents = await _history(L, clock)
        assert await L.check() == []
        before = _count(url)
        last_id = int(_sql(url, "SELECT MAX(id) FROM ledger_transfers")[0][0])
        since = datetime.fromtimestamp((L.now_ms() - 20 * DAY_S * 1000) / 1000, UTC)
        until = datetime.fromtimestamp(L.now_ms() / 1000, UTC)
        statement = await L.statement(agents[1], since, until)

        # The job on its own thread while holds settle, void and expire next to it, round
        # after round until it is done, and checks run meanwhile: each sees every deleted
        # transfer either as its row or as its sums.
        job = asyncio.ensure_future(asyncio.to_thread(run_once, POLICY, url, L.now_ms()))
        settled = rounds = 0
        while rounds < 500 and (rounds < 3 or not job.done()):
            settled += await _traffic(L, agents, f"new{rounds}-", 60, seed=100 + rounds)
            assert await L.check() == [], f"check during deletion, round {rounds}"
            rounds += 1
        report = await job
        await L.flush()
        assert settled > 0
        assert report.holds_compacted > 0
        assert report.transfers_deleted > 0
        horizon = _horizon(url)
        assert horizon % PERIOD_MS == 0
        assert L.now_ms() - 47 * DAY_S * 1000 <= horizon <= L.now_ms() - 40 * DAY_S * 1000
        # Every transfer is a row or counted in a dropped sum, once.
        new = _count(url, f"WHERE id > {last_id}")
        assert _count(url) + _dropped(url) == before + new
        assert _dropped(url) == report.transfers_deleted
        assert _count(url, f"WHERE ts_ms >= {horizon}") >= new
        if backend(url) == "postgres":  # March and April went as partitions
            gone = {"ledger_transfers_p202603", "ledger_transfers_p202604"}
            assert not gone & set(_partitions(url)), _partitions(url)
        assert await L.check() == [], "check must pass after deleting transfers"
        # Balances, stored and in memory, equal the sums of their period nets.
        assert set(_balances_from_periods(url).values()) == {0}
        for acc in L.accounts():
            assert acc.balance_nano == _balances_from_periods_sum(url, acc.id)
        # Statements from the horizon on are unchanged.
        assert await L.statement(agents[1], since, until) == statement

        # What the check still sees: sums that no longer match.
        _sql(url, "UPDATE ledger_bucket_bases SET net_nano = net_nano + 1"
                  " WHERE bucket_id = (SELECT MIN(bucket_id) FROM ledger_bucket_bases)")  # fmt: skip
        _sql(url, "UPDATE ledger_transfers_dropped SET amount_nano = amount_nano + 1"
                  " WHERE kind = 'cost'")  # fmt: skip
        _sql(url, "UPDATE ledger_account_periods SET dropped_nano = dropped_nano + 1"
                  " WHERE period_start_ms = (SELECT MIN(period_start_ms)"
                  " FROM ledger_account_periods)")  # fmt: skip
        problems = await L.check()
        assert any(p.startswith("store bucket") for p in problems), problems
        assert any("costs posted" in p for p in problems), problems
        assert any("period net" in p for p in problems), problems

    run(with_ledger(url, body, Clock(START)))


def _balances_from_periods_sum(url: str, account_id: int) -> int:
    rows = _sql(
        url, f"SELECT SUM(net_nano) FROM ledger_account_periods WHERE account_id = {account_id}"
    )
    return int(rows[0][0] or 0)


class Crash(Exception):
    pass


def test_a_failed_deletion_loses_nothing(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        await _history(L, clock)
        before = _count(url)
        now_ms = L.now_ms()
        if backend(url) == "postgres":  # the month partition's transaction fails at its end
            monkeypatch.setattr(expiry_module, "MONTH_DROPPED", "SELECT 1/0")
            with pytest.raises(Exception, match="division by zero"):
                await asyncio.to_thread(run_once, POLICY, url, now_ms)
            monkeypatch.undo()
            assert (_count(url), _dropped(url)) == (before, 0)
            assert await L.check() == []

        apply = TransferExpiry._apply

        def crash_after_sums(self: TransferExpiry, sums: Any) -> None:
            apply(self, sums)
            raise Crash("the process died before the rows went")

        monkeypatch.setattr(TransferExpiry, "_apply", crash_after_sums)
        with pytest.raises(Crash):
            await asyncio.to_thread(run_once, POLICY, url, now_ms)
        monkeypatch.undo()
        # The horizon moved, no batch committed: rows, and no sums of them.
        assert _horizon(url) > 0
        assert _count(url) + _dropped(url) == before
        assert await L.check() == []
        report = await asyncio.to_thread(run_once, POLICY, url, now_ms)
        assert report.transfers_deleted > 0
        assert _count(url) + _dropped(url) == before
        assert await L.check() == []

    run(with_ledger(url, body, Clock(START)))


def test_a_statement_before_the_horizon_is_refused(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        agents = await _history(L, clock)
        old = datetime.fromtimestamp((L.now_ms() - 60 * DAY_S * 1000) / 1000, UTC)
        until = datetime.fromtimestamp(L.now_ms() / 1000, UTC)
        await L.statement(agents[0], old, until)  # every transfer still there
        await asyncio.to_thread(run_once, POLICY, url, L.now_ms())
        horizon = _horizon(url)
        with pytest.raises(BeforeHorizon) as caught:
            await L.statement(agents[0], old, until)
        assert caught.value.horizon_ms == horizon
        err = api_error(caught.value)
        assert (err.status, err.code, err.param) == (400, "before_retention_horizon", "since")
        when = datetime.fromtimestamp(horizon / 1000, UTC).isoformat().replace("+00:00", "Z")
        assert when in err.message and "export" in err.message
        at = datetime.fromtimestamp(horizon / 1000, UTC)
        assert (await L.statement(agents[0], at, until))["closing_nano"] == (
            L.balance(agents[0]).balance_nano
        )

    run(with_ledger(url, body, Clock(START)))


def test_a_week_that_disagrees_is_not_deleted(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        await _history(L, clock)
        # A period row off by one in the oldest week: that week is refused, and every one
        # after it (the horizon only covers weeks proved whole).
        _sql(url, "UPDATE ledger_account_periods SET net_nano = net_nano + 1"
                  " WHERE period_start_ms = (SELECT MIN(period_start_ms)"
                  " FROM ledger_account_periods) AND account_id = (SELECT MIN(account_id)"
                  " FROM ledger_account_periods)")  # fmt: skip
        before = _count(url)
        report = await asyncio.to_thread(run_once, POLICY, url, L.now_ms())
        assert report.transfers_deleted == 0
        assert (_count(url), _dropped(url)) == (before, 0)

    run(with_ledger(url, body, Clock(START)))


def _partitions(url: str) -> list[str]:
    rows = _sql(
        url,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass('ledger_transfers') ORDER BY 1",
    )
    return [r[0] for r in rows]


def _relkind(url: str) -> str:
    return str(
        _sql(url, "SELECT relkind FROM pg_class WHERE oid = to_regclass('ledger_transfers')")[0][0]
    )


@pytest.mark.parametrize("url", ["postgres"], indirect=True)
def test_months_go_as_partitions_and_a_retried_batch_counts_once(url: str) -> None:
    async def body(L: Ledger, clock: Clock) -> None:
        assert _relkind(url) == "p"
        # Made at open: this month and the next, and the default partition.
        assert _partitions(url) == [
            "ledger_transfers_default", "ledger_transfers_p202603", "ledger_transfers_p202604"
        ]  # fmt: skip
        org, _team, _user = await org_tree(L)
        await L.top_up(org, 500, idempotency_key="t1")
        await L.flush()
        # The same transfers written again (a batch retried after a lost answer), once into
        # its month's partition and once into the default one (a month not made yet, made
        # between the two writes): the rows and the period nets count them once.
        late_ms = int(datetime(2030, 1, 5, tzinfo=UTC).timestamp() * 1000)
        for ts_ms, tid in ((L.now_ms(), 10**9), (late_ms, 10**9 + 1)):
            row = (tid, ts_ms, "top_up", 1, org, 7, None, None, None, None, None)
            batch = expiry_module_batch([row])
            await L.store.write(batch)
            if ts_ms == late_ms:
                assert _count(url, f"WHERE id = {tid}") == 1
                job = TransferExpiry(url)
                try:
                    job.ensure_partitions(late_ms)
                finally:
                    job.close()
                assert "ledger_transfers_p203001" in _partitions(url)
            await L.store.write(batch)
            assert _count(url, f"WHERE id = {tid}") == 1
            week = ts_ms - ts_ms % PERIOD_MS
            net = _sql(url, "SELECT net_nano FROM ledger_account_periods WHERE account_id ="
                            f" {org} AND period_start_ms = {week}")[0][0]  # fmt: skip
            assert int(net) == (500 + 7 if ts_ms != late_ms else 7)
        assert _count(url, "WHERE id >= 1000000000") == 2

        clock.advance(100 * DAY_S)  # 2026-06-18: the horizon passes the end of April
        await asyncio.to_thread(run_once, POLICY, url, L.now_ms())
        names = _partitions(url)
        assert "ledger_transfers_p202603" not in names and "ledger_transfers_p202604" not in names
        assert _dropped(url) == 2  # the top-up and the first test row: March's
        assert _count(url, "WHERE id >= 1000000000") == 1

    run(with_ledger(url, body, Clock(START)))


def expiry_module_batch(transfers: list[tuple[Any, ...]]) -> Any:
    from tokenworks.ledger.rows import Batch

    batch = Batch.empty(0)
    batch.transfers.extend(transfers)  # type: ignore[arg-type]
    return batch


@pytest.mark.parametrize("url", ["postgres"], indirect=True)
def test_an_unpartitioned_table_loses_rows_in_batches(url: str) -> None:
    from tokenworks.db import split_schema
    from tokenworks.ledger.schema import TRANSFERS

    _sql(url, f"CREATE SCHEMA IF NOT EXISTS {split_schema(url)[1]}")
    for stmt in TRANSFERS.ddl("postgres"):  # what an earlier version made
        _sql(url, stmt)

    async def body(L: Ledger, clock: Clock) -> None:
        assert _relkind(url) == "r"
        await _history(L, clock)
        before = _count(url)
        report = await asyncio.to_thread(run_once, POLICY, url, L.now_ms())
        assert report.transfers_deleted > POLICY.batch_rows  # several batches
        assert _count(url) + _dropped(url) == before
        assert await L.check() == []
        assert _relkind(url) == "r"

    run(with_ledger(url, body, Clock(START)))


def test_a_ledger_from_before_retention_is_upgraded_and_restarts_clean(url: str) -> None:
    """Period rows written before `dropped_nano` get it (0) on open; after a deletion a
    restarted ledger loads from its stored balances and its check still passes."""

    async def first(L: Ledger, clock: Clock) -> int:
        await _history(L, clock)
        return L.now_ms()

    now_ms = run(with_ledger(url, first, Clock(START)))
    _sql(url, "ALTER TABLE ledger_account_periods DROP COLUMN dropped_nano")
    report = None

    async def second(L: Ledger, clock: Clock) -> None:
        nonlocal report
        assert await L.check() == []
        report = await asyncio.to_thread(run_once, POLICY, url, now_ms)
        assert await L.check() == []

    later = Clock(START)
    later.t = now_ms / 1000
    run(with_ledger(url, second, later))
    assert report is not None and report.transfers_deleted > 0

    async def third(L: Ledger, clock: Clock) -> None:
        assert await L.check() == []

    run(with_ledger(url, third, later))
