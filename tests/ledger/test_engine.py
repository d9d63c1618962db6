"""The pure ledger engine: grants, budgets, holds, delegation, invariants (no store)."""

from __future__ import annotations

import cProfile
import pstats
import random
import threading
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenworks.ledger.domain import (
    AccountKind,
    HoldClosed,
    HoldStatus,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    Period,
    PolicyDenied,
    Recurrence,
    Refused,
)
from tokenworks.ledger.engine import Engine
from tokenworks.ledger.grants import allocate, rollover_split
from tokenworks.ledger.periods import period_end_ms, period_start_ms, to_ms

T0 = to_ms(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
DAY_MS = 86_400_000
_keys = iter(range(10**9))


def k() -> str:
    return f"k{next(_keys)}"


def tree(eng: Engine, *, depth: int = 3, draws: bool = True) -> list[int]:
    """org > team > user (> agent): returns ids root first."""
    kinds = [AccountKind.ORGANISATION, AccountKind.TEAM, AccountKind.USER, AccountKind.AGENT]
    ids: list[int] = []
    for kind in kinds[:depth]:
        parent = ids[-1] if ids else None
        acc = eng.create_account(
            f"{kind}-{len(ids)}",
            parent,
            kind,
            draws_on_parent=draws,
            idempotency_key=k(),
            now_ms=T0,
        )
        ids.append(acc["id"])
    return ids


def fresh() -> Engine:
    eng = Engine()
    eng.bootstrap(T0)
    return eng


def spend(eng: Engine, chain: list[int], amount: int, now: int = T0, **kw: object) -> None:
    rid = k()
    eng.hold(rid, chain, amount, ttl_ms=60_000, now_ms=now, **kw)  # type: ignore[arg-type]
    eng.settle(rid, price_nano=amount, cost_nano=0, producer="p", model="m", now_ms=now)


# ---------------------------------------------------------------------- grants


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grants=st.lists(
        st.tuples(
            st.integers(0, 3),  # priority
            st.one_of(st.none(), st.integers(1, 5)),  # expiry in days
            st.integers(1, 1000),  # amount
        ),
        min_size=1,
        max_size=8,
    ),
    cash=st.integers(0, 500),
    frac=st.floats(0, 1),
)
def test_spend_consumes_by_priority_then_expiry_then_age(grants, cash, frac) -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    if cash:
        eng.top_up(org, cash, idempotency_key=k(), now_ms=T0)
    for prio, days, amount in grants:
        exp = T0 + days * DAY_MS if days else None
        eng.grant(org, amount, expires_ms=exp, priority=prio, idempotency_key=k(), now_ms=T0)
    total = cash + sum(g[2] for g in grants)
    amount = int(total * frac)
    spend(eng, [org], amount)
    acc = eng.accounts[org]
    # The expected order, from the inputs alone: (priority, expiry, age), cash last.
    inf = float("inf")
    expected = sorted(range(len(grants)), key=lambda i: (grants[i][0], grants[i][1] or inf, i))
    left = amount
    want: dict[int, int] = {}
    for i in expected:
        take = min(grants[i][2], left)
        left -= take
        want[i + 1] = grants[i][2] - take  # grant ids are 1-based in creation order
    want_cash = cash - min(cash, left)
    got = {
        eng.buckets[b].grant_id: eng.buckets[b].remaining_nano
        for b in acc.bucket_ids
        if eng.buckets[b].grant_id is not None
    }
    assert got == want
    assert eng.buckets[acc.cash_bucket_id].remaining_nano == want_cash
    assert acc.bucket_ids[-1] == acc.cash_bucket_id
    assert eng.check(T0) == []


@settings(max_examples=40, deadline=None)
@given(
    grants=st.lists(
        st.tuples(st.integers(1, 10), st.integers(1, 500)), min_size=1, max_size=6
    ),  # (expiry hour offset, amount)
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 400)), max_size=12),
)
def test_expired_credit_goes_to_expiry_account_never_spent(grants, ops) -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    hour = 3_600_000
    for hours, amount in grants:
        eng.grant(org, amount, expires_ms=T0 + hours * hour, idempotency_key=k(), now_ms=T0)
    now = T0
    spent = 0
    for advance, amount in ops:
        now += advance * hour
        rid = k()
        try:
            h = eng.hold(rid, [org], amount, ttl_ms=1000, now_ms=now)
        except Refused:
            continue
        for leg in h.legs:
            b = eng.buckets[leg.bucket_id]
            assert b.expires_ms is None or b.expires_ms > now, "spent expired credit"
        eng.settle(rid, price_nano=amount, cost_nano=0, producer="p", model="m", now_ms=now)
        spent += amount
    end = T0 + 11 * hour
    eng.sweep(end)
    expired = eng.operator_account(AccountKind.EXPIRED).balance_nano
    granted = sum(a for _, a in grants)
    assert eng.accounts[org].balance_nano == 0  # every grant has expired by `end`
    assert spent + expired == granted
    assert eng.check(end) == []


@settings(max_examples=40, deadline=None)
@given(
    amount=st.integers(1, 1000),
    cap=st.one_of(st.none(), st.integers(0, 1500)),
    spends=st.lists(st.integers(0, 2500), min_size=1, max_size=10),
)
def test_recurring_grant_rolls_over_up_to_cap(amount, cap, spends) -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.grant(
        org,
        amount,
        recurring=Recurrence(Period.DAY),
        rollover_cap_nano=cap,
        idempotency_key=k(),
        now_ms=T0,
    )
    model_balance = amount
    model_expired = 0
    day_start = period_start_ms(Period.DAY, "UTC", T0)
    for i, want in enumerate(spends):
        now = day_start + i * DAY_MS + 3_600_000
        eng.sweep(now)
        assert eng.accounts[org].balance_nano == model_balance, f"day {i}"
        take = min(want, model_balance)
        if take:
            spend(eng, [org], take, now)
        model_balance -= take
        carry = model_balance if cap is None else min(model_balance, cap)
        model_expired += model_balance - carry
        model_balance = carry + amount
    eng.sweep(day_start + len(spends) * DAY_MS)
    assert eng.accounts[org].balance_nano == model_balance
    assert eng.operator_account(AccountKind.EXPIRED).balance_nano == model_expired
    assert eng.check(day_start + len(spends) * DAY_MS) == []


def test_rollover_split_and_allocate_edges() -> None:
    assert rollover_split(100, None) == (100, 0)
    assert rollover_split(100, 0) == (0, 100)
    assert rollover_split(100, 30) == (30, 70)
    assert allocate([], 10) == []


def test_monthly_boundary_is_local_midnight_in_the_grant_time_zone() -> None:
    at = to_ms(datetime(2026, 3, 31, 23, 30, tzinfo=UTC))  # already April 1st in Paris
    start = period_start_ms(Period.MONTH, "Europe/Paris", at)
    assert start == to_ms(datetime(2026, 3, 31, 22, 0, tzinfo=UTC))  # 00:00 CEST
    end = period_end_ms(Period.MONTH, "Europe/Paris", at)
    assert end == to_ms(datetime(2026, 4, 30, 22, 0, tzinfo=UTC))
    week = period_start_ms(Period.WEEK, "UTC", to_ms(datetime(2026, 3, 12, tzinfo=UTC)))
    assert week == to_ms(datetime(2026, 3, 9, tzinfo=UTC))  # a Monday


def test_grant_issued_later_and_held_credit_expires_on_release() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.grant(
        org, 100, effective_ms=T0 + 1000, expires_ms=T0 + 5000, idempotency_key=k(), now_ms=T0
    )
    assert eng.accounts[org].balance_nano == 0  # not yet effective
    h = eng.hold("r", [org], 80, ttl_ms=60_000, now_ms=T0 + 2000)
    eng.sweep(T0 + 6000)  # the grant ends while 80 is held: 20 expires now
    assert eng.operator_account(AccountKind.EXPIRED).balance_nano == 20
    eng.settle(h.id, price_nano=30, cost_nano=0, producer="p", model="m", now_ms=T0 + 7000)
    assert eng.operator_account(AccountKind.EXPIRED).balance_nano == 70  # the unused 50
    assert eng.accounts[org].balance_nano == 0
    assert eng.check(T0 + 7000) == []


# ---------------------------------------------------------------------- holds & budgets


def test_hold_draws_leaf_first_then_parents_and_refusal_names_the_limit() -> None:
    eng = fresh()
    org, team, user = tree(eng)
    eng.top_up(org, 1000, idempotency_key=k(), now_ms=T0)
    eng.grant(user, 100, idempotency_key=k(), now_ms=T0)
    h = eng.hold("r1", [org, team, user], 300, ttl_ms=1000, now_ms=T0)
    assert [(leg.account_id, leg.amount_nano) for leg in h.legs] == [(user, 100), (org, 200)]
    assert h.available_after_nano == 800
    with pytest.raises(Refused) as e:
        eng.hold("r2", [user], 900, ttl_ms=1000, now_ms=T0)
    assert (e.value.account_id, e.value.limit_kind) == (org, "credit")
    assert (e.value.needed_nano, e.value.available_nano) == (900, 800)
    eng.set_budget(f"account:{team}", 500, Period.DAY, idempotency_key=k(), now_ms=T0)
    with pytest.raises(Refused) as e:
        eng.hold("r3", [user], 201, ttl_ms=1000, now_ms=T0)  # team: 500 - 300 held
    assert (e.value.scope, e.value.limit_kind) == (f"account:{team}", "budget:day")
    assert "day budget too small" in str(e.value)
    eng.set_budget("key:k1", 50, Period.TOTAL, idempotency_key=k(), now_ms=T0)
    with pytest.raises(Refused) as e:
        eng.hold("r4", [user], 60, key_scopes=["k1"], ttl_ms=1000, now_ms=T0)
    assert e.value.key_id == "k1"
    assert eng.check(T0) == []


def test_account_that_does_not_draw_on_parent_spends_only_its_own_credit() -> None:
    eng = fresh()
    org, team, user = tree(eng, draws=False)
    eng.top_up(org, 1000, idempotency_key=k(), now_ms=T0)
    eng.grant(user, 100, idempotency_key=k(), now_ms=T0)
    with pytest.raises(Refused) as e:
        eng.hold("r", [org, team, user], 101, ttl_ms=1000, now_ms=T0)
    assert (e.value.account_id, e.value.available_nano) == (user, 100)


def test_settle_never_charges_more_than_held_and_holds_expire() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.top_up(org, 1000, idempotency_key=k(), now_ms=T0)
    eng.hold("a", [org], 100, ttl_ms=1000, now_ms=T0)
    h = eng.settle("a", price_nano=150, cost_nano=90, producer="p", model="m", now_ms=T0)
    assert (h.price_nano, h.clamped_nano) == (100, 50)
    assert eng.accounts[org].balance_nano == 900
    payable = eng.payable_for("p", T0).id
    assert eng.balance(payable, T0).balance_nano == 90  # accrued, posted when read
    eng.hold("b", [org], 300, ttl_ms=1000, now_ms=T0)
    assert eng.balance(org, T0).available_nano == 600
    assert eng.sweep(T0 + 999)["holds_expired"] == 0
    assert eng.sweep(T0 + 1000)["holds_expired"] == 1
    assert eng.balance(org, T0).available_nano == 900
    with pytest.raises(HoldClosed):
        eng.settle("b", price_nano=1, cost_nano=0, producer="p", model="m", now_ms=T0 + 1001)
    assert eng.check(T0 + 1000) == []


def test_budget_period_resets_and_counts_from_when_it_was_set() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.top_up(org, 10_000, idempotency_key=k(), now_ms=T0)
    spend(eng, [org], 400)  # before the budget: not counted
    eng.set_budget(f"account:{org}", 500, Period.DAY, idempotency_key=k(), now_ms=T0)
    spend(eng, [org], 500)
    with pytest.raises(Refused):
        eng.hold("x", [org], 1, ttl_ms=1000, now_ms=T0)
    spend(eng, [org], 500, T0 + DAY_MS)  # next day: room again
    assert eng.balance(org, T0 + DAY_MS).spent_this_period_nano == {"day": 500}


# ---------------------------------------------------------------------- delegation


def test_delegated_budget_reserves_in_parent_and_returns_unspent() -> None:
    eng = fresh()
    org, _, user = tree(eng)
    eng.top_up(org, 100_000, idempotency_key=k(), now_ms=T0)
    eng.set_budget("key:p", 10_000, Period.MONTH, idempotency_key=k(), now_ms=T0)
    eng.delegate("key:p", "key:c", 4_000, expires_ms=None, idempotency_key=k(), now_ms=T0)
    (pb,) = eng.budget_view("key:p", T0)
    assert pb["room_nano"] == 6_000
    with pytest.raises(Refused) as e:
        eng.delegate("key:p", "key:c2", 6_001, expires_ms=None, idempotency_key=k(), now_ms=T0)
    assert (e.value.scope, e.value.limit_kind) == ("key:p", "budget:month")
    # The child spends 1,000: it counts against the parent, whose room does not move.
    spend(eng, [user], 1_000, key_scopes=["c"])
    (pb,) = eng.budget_view("key:p", T0)
    assert (pb["spent_nano"], pb["room_nano"]) == (1_000, 6_000)
    with pytest.raises(Refused) as e:
        eng.hold("big", [user], 3_001, key_scopes=["c"], ttl_ms=1000, now_ms=T0)
    assert e.value.scope == "key:c"
    # The parent itself cannot use the child's reservation.
    with pytest.raises(Refused):
        eng.hold("p1", [user], 6_001, key_scopes=["p"], ttl_ms=1000, now_ms=T0)
    eng.delegate("key:c", "key:g", 2_000, expires_ms=T0 + 5000, idempotency_key=k(), now_ms=T0)
    spend(eng, [user], 500, key_scopes=["g"])
    assert eng.budget_view("key:p", T0)[0]["spent_nano"] == 1_500
    assert eng.budget_view("key:c", T0)[0]["room_nano"] == 3_000 - 2_000
    eng.sweep(T0 + 5000)  # the grandchild expires: its unspent 1,500 returns to c
    assert eng.budget_view("key:g", T0 + 5000)[0]["revoked"]
    assert eng.budget_view("key:c", T0 + 5000)[0]["room_nano"] == 4_000 - 1_500
    h = eng.hold("open", [user], 100, key_scopes=["c"], ttl_ms=60_000, now_ms=T0 + 5000)
    assert eng.revoke("key:p", idempotency_key=k(), now_ms=T0 + 5000)["revoked"][0] == "key:p"
    with pytest.raises(Refused) as e:
        eng.hold("after", [user], 1, key_scopes=["c"], ttl_ms=1000, now_ms=T0 + 5000)
    assert e.value.limit_kind == "revoked"
    eng.settle(h.id, price_nano=100, cost_nano=0, producer="p", model="m", now_ms=T0 + 5000)
    assert eng.budget_view("key:p", T0 + 5000)[0]["spent_nano"] == 1_600
    assert eng.check(T0 + 5000) == []


def test_revoking_a_child_returns_its_room_to_the_parent() -> None:
    eng = fresh()
    org, _, user = tree(eng)
    eng.top_up(org, 100_000, idempotency_key=k(), now_ms=T0)
    eng.set_budget("key:p", 10_000, Period.DAY, idempotency_key=k(), now_ms=T0)
    eng.delegate("key:p", "key:c", 4_000, expires_ms=None, idempotency_key=k(), now_ms=T0)
    spend(eng, [user], 1_000, key_scopes=["c"])
    eng.revoke("key:c", idempotency_key=k(), now_ms=T0)
    (pb,) = eng.budget_view("key:p", T0)
    assert (pb["spent_nano"], pb["delegated_nano"], pb["room_nano"]) == (1_000, 0, 9_000)
    assert eng.check(T0) == []


def test_a_thousand_sub_agents_are_cheap() -> None:
    """Delegating to and spending through N sub-agents is linear in N: counted in Python
    function calls (deterministic, unlike time on a shared machine), 1,000 sub-agents cost
    about ten times what 100 do, not a hundred times."""

    def calls(n: int) -> tuple[Engine, int]:
        eng = fresh()
        org, _, user = tree(eng)
        eng.top_up(org, 10**12, idempotency_key=k(), now_ms=T0)
        eng.set_budget("key:root", 10**9, Period.MONTH, idempotency_key=k(), now_ms=T0)
        profile = cProfile.Profile()
        profile.enable()
        for i in range(n):
            eng.delegate(
                "key:root", f"key:a{i}", 100_000, expires_ms=T0 + 60_000, idempotency_key=k(),
                now_ms=T0,
            )  # fmt: skip
            spend(eng, [user], 1_000, key_scopes=[f"a{i}"])
        profile.disable()
        return eng, pstats.Stats(profile).total_calls  # type: ignore[attr-defined]

    _, small = calls(100)
    eng, large = calls(1000)
    assert large < 12 * small, (small, large)
    (root,) = eng.budget_view("key:root", T0)
    assert root["spent_nano"] == 1_000_000
    assert root["delegated_nano"] == 1000 * 99_000
    for _ in range(10):  # all children expire at once: in bounded turns of the sweep
        if not eng.sweep(T0 + 60_000)["more"]:
            break
    (root,) = eng.budget_view("key:root", T0 + 60_000)
    assert (root["delegated_nano"], root["room_nano"]) == (0, 10**9 - 1_000_000)
    assert eng.check(T0 + 60_000) == []


# ---------------------------------------------------------------------- idempotency, policy


def test_engine_idempotency_and_conflicts() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    a = eng.top_up(org, 100, idempotency_key="t", now_ms=T0)
    assert eng.top_up(org, 100, idempotency_key="t", now_ms=T0) == a
    assert eng.accounts[org].balance_nano == 100
    with pytest.raises(IdempotencyConflict):
        eng.top_up(org, 101, idempotency_key="t", now_ms=T0)
    h1 = eng.hold("r", [org], 10, ttl_ms=1000, now_ms=T0)
    assert eng.hold("r", [org], 10, ttl_ms=1000, now_ms=T0) is h1
    with pytest.raises(IdempotencyConflict):
        eng.hold("r", [org], 11, ttl_ms=1000, now_ms=T0)
    eng.settle("r", price_nano=5, cost_nano=1, producer="p", model="m", now_ms=T0)
    eng.settle("r", price_nano=5, cost_nano=1, producer="p", model="m", now_ms=T0)
    assert eng.accounts[org].balance_nano == 95
    with pytest.raises(IdempotencyConflict):
        eng.settle("r", price_nano=6, cost_nano=1, producer="p", model="m", now_ms=T0)
    with pytest.raises(HoldClosed):
        eng.void("r", now_ms=T0)


def test_transfer_policy() -> None:
    eng = fresh()
    org, team, user = tree(eng)
    other = eng.create_account("other", None, "organisation", idempotency_key=k(), now_ms=T0)
    eng.top_up(team, 1000, idempotency_key=k(), now_ms=T0)
    eng.transfer(team, user, 300, actor=f"account:{org}", idempotency_key=k(), now_ms=T0)
    with pytest.raises(PolicyDenied):  # the user does not own the team's credit
        eng.transfer(team, user, 1, actor=f"account:{user}", idempotency_key=k(), now_ms=T0)
    with pytest.raises(PolicyDenied):
        eng.transfer(team, other["id"], 1, actor="operator", idempotency_key=k(), now_ms=T0)
    with pytest.raises(Refused):
        eng.transfer(user, team, 301, actor=f"account:{user}", idempotency_key=k(), now_ms=T0)
    with pytest.raises(InvalidRequest):
        eng.transfer(user, 1, 1, actor="operator", idempotency_key=k(), now_ms=T0)
    assert (eng.accounts[team].balance_nano, eng.accounts[user].balance_nano) == (700, 300)


def test_check_reports_corruption() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.top_up(org, 100, idempotency_key=k(), now_ms=T0)
    eng.hold("r", [org], 10, ttl_ms=1000, now_ms=T0)
    assert eng.check(T0) == []
    eng.accounts[org].balance_nano += 1
    v = eng.check(T0)
    assert any("sum of balances" in x for x in v) and any("buckets" in x for x in v)
    eng.accounts[org].balance_nano -= 1
    eng.sweep(T0 + 500)
    eng.holds["r"].expires_ms = T0 + 100  # an open hold past expiry after a sweep
    assert any("past its expiry" in x for x in eng.check(T0 + 500))


# ---------------------------------------------------------------------- threads


def test_thread_hammer_never_exceeds_any_limit() -> None:
    eng = fresh()
    org, team, user = tree(eng)
    agents = [
        eng.create_account(f"a{i}", user, "agent", idempotency_key=k(), now_ms=T0)["id"]
        for i in range(4)
    ]
    eng.top_up(org, 60_000, idempotency_key=k(), now_ms=T0)
    eng.set_budget(f"account:{team}", 40_000, Period.DAY, idempotency_key=k(), now_ms=T0)
    for a in agents:
        eng.set_budget(f"account:{a}", 12_000, Period.TOTAL, idempotency_key=k(), now_ms=T0)
    eng.set_budget("key:shared", 30_000, Period.MONTH, idempotency_key=k(), now_ms=T0)
    refused = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for i in range(400):
                rid = f"t{seed}-{i}"
                agent = rnd.choice(agents)
                try:
                    eng.hold(
                        rid,
                        [agent],
                        rnd.randint(50, 900),
                        key_scopes=["shared"],
                        ttl_ms=60_000,
                        now_ms=T0,
                    )
                except Refused as e:
                    refused.append(e.limit_kind)
                    continue
                if rnd.random() < 0.8:
                    h = eng.find_hold(rid)
                    assert h is not None
                    price = rnd.randint(0, h.amount_nano)
                    eng.settle(
                        rid,
                        price_nano=price,
                        cost_nano=price // 2,
                        producer="p",
                        model="m",
                        now_ms=T0,
                    )
                else:
                    eng.void(rid, now_ms=T0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert refused, "the limits were never reached: the test proves nothing"
    for scope, per in eng.budgets.items():
        for b in per.values():
            assert b.spent_nano + b.held_nano <= b.limit_nano, scope
    assert eng.accounts[org].balance_nano >= 0
    assert all(h.status is HoldStatus.OPEN for h in eng.holds.values())
    assert eng.check(T0) == []


def test_memory_for_holds_is_bounded_by_the_holds_in_flight() -> None:
    """Settled holds leave no trail that grows with the request rate: the expiry heap is
    rebuilt from the open holds, and a closed hold keeps no legs."""
    from tokenworks.ledger.engine import HOLD_HEAP_SLACK

    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.top_up(org, 10**15, idempotency_key=k(), now_ms=T0)
    for i in range(10):
        eng.hold(f"open-{i}", [org], 10, ttl_ms=60_000, now_ms=T0)
    for i in range(3 * HOLD_HEAP_SLACK):
        eng.hold(f"r{i}", [org], 1_000, ttl_ms=60_000, now_ms=T0)
        h = eng.settle(f"r{i}", price_nano=500, cost_nano=0, producer="p", model="m", now_ms=T0)
        assert h.legs == ()
        assert len(eng._hold_heap) <= 2 * len(eng.holds) + HOLD_HEAP_SLACK + 1
    assert len(eng.holds) == 10
    # The open holds still expire when due, and nothing else happens.
    assert eng.sweep(T0 + 60_000)["holds_expired"] == 10
    assert eng._hold_heap == [] and eng.check(T0 + 60_000) == []


def test_a_hold_names_a_real_path_to_its_payer() -> None:
    eng = fresh()
    org, team, user = tree(eng)
    other_team = eng.create_account("other", org, AccountKind.TEAM, idempotency_key=k(), now_ms=T0)[
        "id"
    ]
    eng.top_up(org, 1_000, idempotency_key=k(), now_ms=T0)
    for chain in ([user], [team, user], (org, team, user)):  # any suffix of the path
        eng.hold(k(), chain, 10, ttl_ms=1000, now_ms=T0)
    for chain in ([other_team, user], [org, user], []):
        with pytest.raises(InvalidRequest):
            eng.hold(k(), chain, 10, ttl_ms=1000, now_ms=T0)
    expense = eng.operator_account(AccountKind.EXPENSE).id
    with pytest.raises(InvalidRequest):  # operator accounts never pay for requests
        eng.hold(k(), [expense], 10, ttl_ms=1000, now_ms=T0)
    assert eng.balance(org, T0).held_nano == 30 and eng.check(T0) == []


def test_revoking_a_grant_expires_its_credit_and_stops_its_refills() -> None:
    eng = fresh()
    (org,) = tree(eng, depth=1)
    eng.top_up(org, 1_000, idempotency_key=k(), now_ms=T0)
    recurring = Recurrence(Period.DAY, "UTC")
    gid = eng.grant(org, 500, recurring=recurring, idempotency_key=k(), now_ms=T0)["grant_id"]
    spend(eng, [org], 200)  # the grant is spent first (its priority is below cash's)
    eng.hold("open", [org], 100, ttl_ms=60_000, now_ms=T0)
    r = eng.revoke_grant(org, gid, idempotency_key="rv", now_ms=T0 + 1)
    assert r["expired_nano"] == 200  # 500 - 200 spent - 100 still held
    assert eng.revoke_grant(org, gid, idempotency_key="rv", now_ms=T0 + 2) == r  # a retry
    again = eng.revoke_grant(org, gid, idempotency_key="rv2", now_ms=T0 + 3)
    assert again["expired_nano"] == 0  # already revoked: nothing more to expire
    eng.settle("open", price_nano=60, cost_nano=0, producer="p", model="m", now_ms=T0 + 4)
    day_ms = 86_400_000
    assert eng.balance(org, T0 + 3 * day_ms).available_nano == 1_000  # no refill, cash intact
    with pytest.raises(NotFound):
        eng.revoke_grant(org + 1, gid, idempotency_key="rv3", now_ms=T0)
    assert eng.check(T0 + 3 * day_ms) == []


def test_thread_hammer_revoking_grants_while_spending_keeps_every_invariant() -> None:
    eng = fresh()
    org, _team, user = tree(eng)
    eng.top_up(org, 50_000, idempotency_key=k(), now_ms=T0)
    recurring = Recurrence(Period.DAY, "UTC")
    grants = [
        eng.grant(user, 3_000, recurring=recurring, idempotency_key=k(), now_ms=T0)["grant_id"]
        for _ in range(6)
    ]
    errors: list[BaseException] = []

    def spender(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for i in range(300):
                rid = f"g{seed}-{i}"
                try:
                    eng.hold(rid, [user], rnd.randint(10, 400), ttl_ms=60_000, now_ms=T0)
                except Refused:
                    continue
                h = eng.find_hold(rid)
                assert h is not None
                if rnd.random() < 0.8:
                    price = rnd.randint(0, h.amount_nano)
                    eng.settle(rid, price_nano=price, cost_nano=0, producer="p", model="m",
                               now_ms=T0)  # fmt: skip
                else:
                    eng.void(rid, now_ms=T0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def revoker() -> None:
        try:
            for gid in grants:
                time.sleep(0.001)
                eng.revoke_grant(user, gid, idempotency_key=f"rv-{gid}", now_ms=T0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spender, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=revoker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(not eng.grants[g].active for g in grants)
    assert all(h.status is HoldStatus.OPEN for h in eng.holds.values())
    assert eng.check(T0) == []
    # Nothing of a revoked grant is left to spend: only cash remains available.
    granted_left = sum(b.remaining_nano for b in eng.buckets.values() if b.grant_id in set(grants))
    assert granted_left == 0
