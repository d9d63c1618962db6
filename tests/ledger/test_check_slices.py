"""`Ledger.check` copies the engine a slice per loop turn while the engine marks what changes,
and reads the marked objects again at the cut (`ledger/slices.py`, issue 13).

What could go wrong, and is tested here: a loop turn that copies everything (counted, not
timed); a mutation point that does not mark (the sliced copy then differs from a whole copy
taken at the same cut, under traffic that creates, changes and prunes objects mid-copy); a
re-copy that does nothing (a figure changed after its slice is then missed); marking that
outlives a cancelled or timed-out check, or grows without bound; two checks at once.
"""

from __future__ import annotations

import asyncio
import gc
import random
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from tests.ledger.test_store import Clock, run, url, with_ledger  # noqa: F401
from tokenworks.db.reads import ReadTimeout
from tokenworks.ledger import Ledger, LedgerBusy, LedgerError, Period, Recurrence, auditor, slices
from tokenworks.ledger.domain import Account, AccountKind, Bucket, TransferKind
from tokenworks.ledger.slices import SlicedCopy

TENANTS = 300
SLICE = 40  # objects a turn in these tests: a copy of 300 tenants takes ~20 turns
WAIT_S = 30.0


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slices, "CHECK_SLICE_OBJECTS", SLICE)


async def _tenants(L: Ledger, n: int = TENANTS) -> list[int]:
    """Organisations with cash and a daily grant each (a bucket renewed and pruned a day)."""
    e, now_ms = L.engine, L.now_ms()
    ids = []
    for i in range(n):
        acc = e.create_account(f"t{i}", None, "organisation", draws_on_parent=False,
                               idempotency_key=f"a{i}", now_ms=now_ms)["id"]  # fmt: skip
        e.top_up(acc, 10_000, idempotency_key=f"t{i}", now_ms=now_ms)
        e.grant(acc, 500, recurring=Recurrence(Period.DAY), rollover_cap_nano=0,
                idempotency_key=f"g{i}", now_ms=now_ms)  # fmt: skip
        ids.append(acc)
    await L.flush()
    return ids


# ---------------------------------------------------------------- what one loop turn reads

READS = [0]


class _CountedAccount(Account):
    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        if name == "balance_nano":
            READS[0] += 1
        return object.__getattribute__(self, name)


class _CountedBucket(Bucket):
    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        if name == "remaining_nano":
            READS[0] += 1
        return object.__getattribute__(self, name)


def test_each_loop_turn_copies_at_most_a_slice(url: str) -> None:  # noqa: F811
    """Counted per loop turn by a task that runs every turn: a whole copy read every
    account's balance in one turn (900 objects here); slices read at most SLICE."""

    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)
        e = L.engine
        for a in e.accounts.values():
            a.__class__ = _CountedAccount
        for b in e.buckets.values():
            b.__class__ = _CountedBucket
        per_turn: list[int] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = READS[0]
            while not done.is_set():
                await asyncio.sleep(0)
                per_turn.append(READS[0] - last)
                last = READS[0]

        async def paying() -> None:
            for i in range(10_000):
                if done.is_set():
                    return
                await L.hold([ids[i % 5]], 7, request_id=f"p{i}")
                await L.settle(f"p{i}", price_nano=3, cost_nano=1, producer="p", model="m",
                               durable=False)  # fmt: skip
                await asyncio.sleep(0)  # (neither call waits: a request's turn ends here)

        tasks = [asyncio.create_task(ticker()), asyncio.create_task(paying())]
        try:
            assert await L.check() == []
        finally:
            done.set()
            await asyncio.gather(*tasks)
        copy = L.last_copy
        assert copy is not None and not copy.whole
        objects = len(e.accounts) + len(e.buckets)
        assert copy.turns >= objects // SLICE  # it did take turns
        # A slice, plus the few objects traffic (5 tenants) and the cut read in a turn.
        assert copy.recopied < 30
        assert max(per_turn) <= SLICE + 30, max(per_turn)
        assert sum(per_turn) >= objects  # and every object was read, over the turns

    run(with_ledger(url, body))


# ---------------------------------------------------------------- sliced == whole, hammered


def _canon(f: auditor.Facts) -> tuple[Any, ...]:
    return (
        sorted(zip(f.account_ids, f.balances, f.account_held, f.kinds, strict=True)),
        sorted(
            zip(
                f.bucket_ids,
                f.bucket_accounts,
                f.remaining,
                f.bucket_held,
                f.ended,
                [x or 0 for x in f.expires_ms],
                strict=True,
            )
        ),
        sorted(f.holds),
        sorted(f.budgets),
        f.grants_due,
        f.last_sweep_ms,
    )


@pytest.mark.parametrize("in_place_max", [0, 10_000])  # merged by a pass / patched in place
def test_checks_under_concurrent_traffic_copy_exactly_what_a_whole_copy_would(
    url: str,  # noqa: F811
    in_place_max: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Holds, settlements, voids, top-ups, transfers, grants, account creation, budgets,
    and sweeps that end and prune buckets run on the loop while checks copy in slices. Every
    check finds nothing, and at every cut the sliced copy equals a whole copy taken at the
    same instant: a mutation point that does not mark would show here."""
    wholes: dict[int, auditor.Facts] = {}
    mismatches: list[str] = []
    seen = {"recopied": 0, "pruned": 0, "created": 0}
    real_cut, real_assemble = SlicedCopy.cut, SlicedCopy.assemble

    def cut(self: SlicedCopy, now_ms: int) -> slices.Taken:
        with self.engine._lock:  # the same instant as the sliced cut
            taken = real_cut(self, now_ms)
            wholes[id(self)] = auditor.facts(self.engine, now_ms)
        seen["recopied"] += self.recopied
        seen["pruned"] += sum(v is None for v in taken.buckets.values())
        seen["created"] += len(set(taken.accounts) - set(self.account_ids))
        return taken

    def assemble(self: SlicedCopy, taken: slices.Taken) -> auditor.Cut:
        cut = real_assemble(self, taken)
        if _canon(cut.facts) != _canon(wholes.pop(id(self))):
            mismatches.append(f"copy {id(self)} differs from a whole copy at its cut")
        return cut

    monkeypatch.setattr(SlicedCopy, "cut", cut)
    monkeypatch.setattr(SlicedCopy, "assemble", assemble)
    monkeypatch.setattr(slices, "PATCH_IN_PLACE_MAX", in_place_max)
    # Small slices, each turn a little longer than a durable write: the copy spans many
    # operations of the traffic, as a copy of 100,000 tenants does.
    monkeypatch.setattr(slices, "CHECK_SLICE_OBJECTS", 5)
    pause = asyncio.sleep
    monkeypatch.setattr(slices, "asyncio", SimpleNamespace(sleep=lambda _: pause(0.002)))

    async def body(L: Ledger, clock: Clock) -> None:
        ids = await _tenants(L, 150)
        await L.set_budget(ids[0], 10**9, "month", idempotency_key="b0")
        rng = random.Random(13)
        done = asyncio.Event()
        n = [0]

        open_holds: list[str] = []  # held across copies: placed in one, closed in another

        async def traffic(worker: int) -> None:
            while not done.is_set():
                n[0] += 1
                i, acc = n[0], rng.choice(ids)
                op = rng.random()
                try:
                    if op < 0.25:
                        await L.hold([acc], rng.randint(1, 900), request_id=f"h{i}")
                        open_holds.append(f"h{i}")
                    elif op < 0.50 and open_holds:
                        h = open_holds.pop(rng.randrange(len(open_holds)))
                        if rng.random() < 0.3:
                            await L.void(h)  # held amounts change, no posting
                        else:  # a price of 0 included: the same
                            await L.settle(h, price_nano=rng.choice([0, rng.randint(1, 900)]),
                                           cost_nano=1, producer="p", model="m",
                                           durable=rng.random() < 0.3)  # fmt: skip
                    elif op < 0.58:
                        await L.top_up(acc, rng.randint(1, 1000), idempotency_key=f"u{i}")
                    elif op < 0.64:
                        await L.transfer(acc, rng.choice(ids), rng.randint(1, 50),
                                         actor="operator", idempotency_key=f"x{i}")  # fmt: skip
                    elif op < 0.72:
                        await L.grant(acc, rng.randint(1, 300), idempotency_key=f"g{i}",
                                      expires_at=_at(L, hours=rng.randint(1, 30)))  # fmt: skip
                    elif op < 0.77:
                        new = await L.create_account(f"n{i}", acc, "team", idempotency_key=f"n{i}")
                        await L.top_up(new.id, 100, idempotency_key=f"nt{i}")
                        ids.append(new.id)
                    elif op < 0.82:
                        clock.advance(rng.randint(600, 4 * 3600))  # days pass: buckets end,
                        await L.sweep_expired()  # holds left open expire
                    await asyncio.sleep(0)
                except LedgerError:
                    pass  # refused (credit), closed by a sweep, ...: the next op goes on

        workers = [asyncio.create_task(traffic(w)) for w in range(4)]
        try:
            for _ in range(12):
                assert await asyncio.wait_for(L.check(), WAIT_S) == []
                assert L.engine.marks is None
        finally:
            done.set()
            await asyncio.gather(*workers)
        assert await L.check() == []

    run(with_ledger(url, body))
    assert mismatches == []
    # The traffic did change, create and prune objects while copies were taken.
    assert seen["recopied"] > 0 and seen["pruned"] > 0 and seen["created"] > 0, seen


DAY_S = 86_400


def _op(name: str, L: Ledger, ids: list[int], team: int, pre: str) -> None:
    """One kind of change, made through the engine after every slice has been read."""
    e, now_ms = L.engine, L.now_ms()
    if name == "hold":
        e.hold("late", [ids[1]], 50, ttl_ms=60_000, now_ms=now_ms)
    elif name == "hold_on_parent":
        e.hold("late", [ids[0], team], 5_000, ttl_ms=60_000, now_ms=now_ms)  # team has none
    elif name == "void":
        e.void(pre, now_ms=now_ms)
    elif name == "settle_at_zero":
        e.settle(pre, price_nano=0, cost_nano=0, producer="p", model="m", now_ms=now_ms)
    elif name == "settle":
        e.settle(pre, price_nano=30, cost_nano=7, producer="p", model="m", now_ms=now_ms)
    elif name == "top_up":
        e.top_up(ids[2], 70, idempotency_key="late", now_ms=now_ms)
    elif name == "transfer":
        e.transfer(ids[0], team, 60, actor="operator", idempotency_key="late", now_ms=now_ms)
    elif name == "grant":
        e.grant(ids[3], 40, idempotency_key="late", now_ms=now_ms)
    elif name == "revoke_grant":
        gid = e._account_grants[ids[4]][0]
        e.revoke_grant(ids[4], gid, idempotency_key="late", now_ms=now_ms)
    elif name == "create_account":
        e.create_account("late", ids[5], "team", idempotency_key="late", now_ms=now_ms)
    elif name in ("renew_and_prune", "expire_holds"):
        L.clock.advance(DAY_S if name == "renew_and_prune" else 120)  # type: ignore[attr-defined]
        while e.sweep(L.now_ms())["more"]:
            pass
    else:
        raise AssertionError(name)


LATE_OPS = [
    "hold", "hold_on_parent", "void", "settle_at_zero", "settle", "top_up", "transfer",
    "grant", "revoke_grant", "create_account", "renew_and_prune", "expire_holds",
    "release_on_an_ended_bucket",
]  # fmt: skip


@pytest.mark.parametrize("late", LATE_OPS)
def test_every_kind_of_change_after_the_slices_is_in_the_cut(
    url: str,  # noqa: F811
    late: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each kind of change, made after every object has been sliced (so only marks can
    bring it in): the sliced copy at the cut equals a whole copy, and the check is clean."""
    compared: list[bool] = []
    real_copy, real_cut, real_assemble = SlicedCopy.copy, SlicedCopy.cut, SlicedCopy.assemble
    ctx: dict[str, Any] = {}
    wholes: list[auditor.Facts] = []

    async def copy(self: SlicedCopy) -> None:
        await real_copy(self)
        _op(ctx["op"], ctx["L"], ctx["ids"], ctx["team"], ctx["pre"])

    def cut(self: SlicedCopy, now_ms: int) -> slices.Taken:
        with self.engine._lock:
            taken = real_cut(self, now_ms)
            wholes.append(auditor.facts(self.engine, now_ms))
        return taken

    def assemble(self: SlicedCopy, taken: slices.Taken) -> auditor.Cut:
        got = real_assemble(self, taken)
        compared.append(_canon(got.facts) == _canon(wholes.pop()))
        return got

    monkeypatch.setattr(SlicedCopy, "copy", copy)
    monkeypatch.setattr(SlicedCopy, "cut", cut)
    monkeypatch.setattr(SlicedCopy, "assemble", assemble)

    async def body(L: Ledger, clock: Clock) -> None:
        ids = await _tenants(L, 60)
        team = (await L.create_account("team", ids[0], "team", idempotency_key="team")).id
        pre = (await L.hold([ids[1]], 50, request_id="pre", ttl_s=60)).id
        op = late
        if late == "release_on_an_ended_bucket":  # the day ends while a hold keeps its grant
            pre = (await L.hold([ids[0]], 5, request_id="pre2", ttl_s=DAY_S)).id
            clock.advance(DAY_S / 2 + 60)  # past midnight UTC, the hold still open
            await L.sweep_expired()
            ended = [b for b in L.engine.buckets.values() if b.ended]
            assert ended, "a bucket ended but kept for its hold"
            op = "void"
        ctx.update(L=L, ids=ids, team=team, pre=pre, op=op)
        assert await L.check() == []
        if late == "release_on_an_ended_bucket":
            assert not any(b.ended for b in L.engine.buckets.values())  # released, pruned

    run(with_ledger(url, body))
    assert compared == [True]


def _at(L: Ledger, hours: int) -> Any:
    from tokenworks.ledger.periods import from_ms

    return from_ms(L.now_ms()) + timedelta(hours=hours)


# ---------------------------------------------------------------- the re-copy is read


def _mispost(L: Ledger, acc_id: int) -> None:
    """Credit an account's balance without its buckets, through the engine's own posting (so
    it is marked, and stored): what a bug in a mutation would leave."""
    e = L.engine
    topups = e.operator_account(AccountKind.TOPUPS)
    e._post(TransferKind.TOP_UP, topups, e.accounts[acc_id], 5, L.now_ms())


def _misposted_mid_copy(monkeypatch: pytest.MonkeyPatch, ctx: dict[str, Any]) -> None:
    """Once every account has been copied (at the first bucket slice), mispost `ctx`'s
    victim: the copy of its balance is stale from then on."""
    real = SlicedCopy._read_buckets

    def read_buckets(self: SlicedCopy, objs: list[Bucket]) -> None:
        real(self, objs)
        if not ctx.get("done"):
            ctx["done"] = True
            _mispost(ctx["L"], ctx["victim"])

    monkeypatch.setattr(SlicedCopy, "_read_buckets", read_buckets)


def test_a_figure_changed_after_its_slice_was_copied_is_reported(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx: dict[str, Any] = {}
    _misposted_mid_copy(monkeypatch, ctx)

    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)
        ctx.update(L=L, victim=ids[3])
        acc = L.engine.accounts[ids[3]]
        violations = await L.check()
        assert ctx["done"]
        assert violations == [
            f"account {acc.id}: buckets {acc.balance_nano - 5}/0 != balance/held"
        ], violations
        assert L.store_compared and L.last_copy is not None and L.last_copy.recopied >= 1

    run(with_ledger(url, body))


# ---------------------------------------------------------------- bounded marking


def test_marking_past_its_bound_stops_and_the_cut_copies_everything(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More objects change during the copy than the bound: marking stops there (and drops its
    ids), the slices stop, and the cut copies everything at once, which sees a change made
    after marking stopped."""
    monkeypatch.setattr(slices, "CHECK_MARKS_MAX", 10)
    ctx: dict[str, Any] = {}
    marks_after_traffic: list[object] = []
    real = SlicedCopy._read_accounts

    def read_accounts(self: SlicedCopy, objs: list[Account]) -> None:
        real(self, objs)
        if not marks_after_traffic:  # after the first slice: more changes than the bound
            L = ctx["L"]
            for i, acc in enumerate(ctx["others"]):
                L.engine.hold(f"over{i}", [acc], 10, ttl_ms=60_000, now_ms=L.now_ms())
            marks_after_traffic.append(L.engine.marks)
            _mispost(L, ctx["victim"])  # not marked: marking has stopped

    monkeypatch.setattr(SlicedCopy, "_read_accounts", read_accounts)

    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)
        ctx.update(L=L, victim=ids[3], others=ids[4:15])
        acc = L.engine.accounts[ids[3]]
        violations = await L.check()
        copy = L.last_copy
        assert copy is not None and copy.marks.overflowed and copy.whole
        assert marks_after_traffic == [None]  # marking stopped at the bound, not at the cut
        assert not copy.marks.accounts and not copy.marks.buckets  # and let go of its ids
        # The whole copy at the cut still sees what changed after the slices.
        assert violations == [
            f"account {acc.id}: buckets {acc.balance_nano - 5}/0 != balance/held"
        ], violations
        assert copy.turns == 1  # the slices stopped with the marking

    run(with_ledger(url, body))


# ---------------------------------------------------------------- a check that ends early


def test_a_cancelled_check_stops_marking(url: str) -> None:  # noqa: F811
    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)
        task = asyncio.create_task(L.check())
        for _ in range(5):
            await asyncio.sleep(0)
        assert L.engine.marks is not None, "the copy should be under way"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert L.engine.marks is None
        await L.hold([ids[0]], 10, request_id="after")  # nothing marks it now
        assert L.engine.marks is None
        assert await L.check() == []

    run(with_ledger(url, body))


def test_a_check_timing_out_at_the_cut_stops_marking_and_its_cut_copies_nothing(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer is stuck in a commit when the check asks for its cut, and the check's time
    limit passes: marking stops, and when the writer comes to the queued cut it skips it
    (a cut run for a check that is gone would copy everything, marking being off)."""
    cuts: list[SlicedCopy] = []
    real_cut = SlicedCopy.cut

    def counted_cut(self: SlicedCopy, now_ms: int) -> slices.Taken:
        cuts.append(self)
        return real_cut(self, now_ms)

    monkeypatch.setattr(SlicedCopy, "cut", counted_cut)

    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)
        stuck, release = asyncio.Event(), asyncio.Event()
        write = L.store.write

        async def stuck_write(*args: Any) -> None:
            stuck.set()
            await release.wait()
            await write(*args)

        L.store.write = stuck_write  # type: ignore[method-assign]
        L.engine.top_up(ids[0], 1, idempotency_key="stuck", now_ms=L.now_ms())
        L.writer.poke()
        await asyncio.wait_for(stuck.wait(), WAIT_S)
        L.read_timeout_s = 0.5
        with pytest.raises(ReadTimeout):
            await L.check()
        assert L.engine.marks is None
        release.set()
        L.store.write = write  # type: ignore[method-assign]
        await L.flush()
        for _ in range(10_000):  # until the writer has come to the queued cut
            if not L.writer._cuts:
                break
            await asyncio.sleep(0.001)
        assert not L.writer._cuts
        assert cuts == []  # the abandoned cut was skipped
        L.read_timeout_s = WAIT_S
        assert await L.check() == []
        assert len(cuts) == 1

    run(with_ledger(url, body))


def test_an_abandoned_copy_cuts_nothing(url: str) -> None:  # noqa: F811
    async def body(L: Ledger, _: Clock) -> None:
        await _tenants(L, 5)
        copy = SlicedCopy(L.engine)
        copy.abandon()
        assert L.engine.marks is None
        with pytest.raises(LedgerError):
            copy.cut(L.now_ms())

    run(with_ledger(url, body))


# ---------------------------------------------------------------- two checks at once


def test_overlapping_checks_copy_one_at_a_time(
    url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live: list[int] = []
    most = [0]
    real_init, real_abandon = SlicedCopy.__init__, SlicedCopy.abandon

    def init(self: SlicedCopy, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        live.append(id(self))
        most[0] = max(most[0], len(live))

    def abandon(self: SlicedCopy) -> None:
        if id(self) in live:
            live.remove(id(self))
        real_abandon(self)

    monkeypatch.setattr(SlicedCopy, "__init__", init)
    monkeypatch.setattr(SlicedCopy, "abandon", abandon)

    async def body(L: Ledger, _: Clock) -> None:
        ids = await _tenants(L)

        async def pay() -> None:
            for i in range(50):
                await L.hold([ids[i]], 10, request_id=f"o{i}")
                await L.settle(f"o{i}", price_nano=4, cost_nano=1, producer="p", model="m")

        results = await asyncio.gather(L.check(), L.check(), pay(), L.check())
        assert results[:2] == [[], []] and results[3] == []
        assert most[0] == 1
        assert L.engine.marks is None
        # Used directly, a second copy while one marks is refused, not interleaved.
        first = SlicedCopy(L.engine)
        with pytest.raises(LedgerBusy):
            SlicedCopy(L.engine)
        first.abandon()

    run(with_ledger(url, body))


def test_the_copys_columns_start_old_for_the_collector(url: str) -> None:  # noqa: F811
    """The collector's young passes walk every element of a young list, the GIL held: the
    copy's columns, grown to a figure per account or bucket, are made old while empty."""

    def young() -> set[int]:
        return {id(o) for o in gc.get_objects(0)} | {id(o) for o in gc.get_objects(1)}

    async def body(L: Ledger, _: Clock) -> None:
        copy = SlicedCopy(L.engine)
        try:
            cols = [getattr(copy, name) for name in slices._COLUMNS]
            assert cols and not {id(c) for c in cols} & young()
        finally:
            copy.abandon()

    run(with_ledger(url, body))
