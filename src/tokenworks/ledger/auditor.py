"""The ledger's auditor: every invariant of the engine in memory, and the store against it.

Kept apart from the state machine (as TigerBeetle keeps `state_machine/auditor.zig`): the
engine applies operations, this module only reads and reports. Each function returns
violations as sentences; an empty list means sound.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, NamedTuple

from tokenworks.ledger.domain import CUSTOMER_KINDS, NEGATIVE_KINDS, AccountKind
from tokenworks.ledger.store import AUDIT_CHUNK_ROWS

if TYPE_CHECKING:
    from tokenworks.ledger.engine import Engine
    from tokenworks.ledger.store import AuditData


HoldFact = tuple[str, int, tuple[tuple[int, int], ...], tuple[str, ...], int]
BudgetFact = tuple[str, str, int, int, int]  # scope, period, held, delegated, want


class Facts(NamedTuple):
    """A copy of the figures the in-memory invariants read, a list per field.

    Copying is taken under the engine's lock on the event loop, at a commit boundary, so it
    must be cheap: a list of one attribute per account or bucket is a tight loop that
    allocates one object (a tuple per account would allocate 100,000 and wake the
    collector). Checking the copy (sums, tallies, sentences) then runs on a thread while
    traffic goes on. Lists of one dict are in its order: nothing changes it between them."""

    account_ids: list[int]
    balances: list[int]
    account_held: list[int]
    kinds: list[AccountKind]
    bucket_ids: list[int]
    bucket_accounts: list[int]
    remaining: list[int]
    bucket_held: list[int]
    ended: list[bool]
    expires_ms: list[int | None]
    holds: list[HoldFact]
    budgets: list[BudgetFact]
    grants_due: bool
    last_sweep_ms: int
    now_ms: int


def facts(engine: Engine, now_ms: int) -> Facts:
    """Copy what `fact_violations` reads at once (O(accounts + buckets)); call under the
    engine's lock with accrued costs posted. `Ledger.check` takes it in slices instead
    (`slices.SlicedCopy`)."""
    accs, buckets = engine.accounts.values(), engine.buckets.values()
    return Facts(
        list(engine.accounts),
        [a.balance_nano for a in accs],
        [a.held_nano for a in accs],
        [a.kind for a in accs],
        list(engine.buckets),
        [b.account_id for b in buckets],
        [b.remaining_nano for b in buckets],
        [b.held_nano for b in buckets],
        [b.ended for b in buckets],
        [b.expires_ms for b in buckets],
        hold_facts(engine),
        budget_facts(engine),
        engine.grants_due(now_ms),
        engine.last_sweep_ms,
        now_ms,
    )


def hold_facts(engine: Engine) -> list[HoldFact]:
    """Open holds as rows: bounded by requests in flight, copied whole at the cut."""
    return [
        (
            h.id,
            h.amount_nano,
            tuple((g.bucket_id, g.amount_nano) for g in h.legs),
            tuple(h.scopes),
            h.expires_ms,
        )
        for h in engine.holds.values()
    ]


def budget_facts(engine: Engine) -> list[BudgetFact]:
    """Budgets as rows, copied whole at the cut (their held and delegated figures move
    with every hold, unmarked)."""
    return [
        (
            scope,
            str(bg.period),
            bg.held_nano,
            bg.delegated_nano,
            0 if bg.revoked else engine.children_unused(scope),
        )
        for scope, per in engine.budgets.items()
        for bg in per.values()
    ]


def fact_violations(f: Facts) -> list[str]:
    """Every in-memory invariant, on a copy (`facts`): safe on any thread."""
    v: list[str] = []
    total = sum(f.balances)
    if total != 0:
        v.append(f"sum of balances is {total}, not 0")
    # Two dicts of ints, not a [remaining, held] list per account: 100,000 lists made on
    # the check's thread are 100,000 objects for the collector, whose passes hold the GIL
    # (and so the event loop) for as long as they take.
    acc_remaining: dict[int, int] = {}
    acc_held: dict[int, int] = {}
    buckets = zip(f.bucket_ids, f.bucket_accounts, f.remaining, f.bucket_held, f.ended,
                  f.expires_ms, strict=True)  # fmt: skip
    for bid, acc_id, remaining, held, ended, expires_ms in buckets:
        if not 0 <= held <= remaining:
            v.append(f"bucket {bid}: held {held} outside [0, {remaining}]")
        if ended and remaining != held:
            v.append(f"bucket {bid}: ended with unheld credit")
        expired = expires_ms is not None and expires_ms <= f.now_ms and not ended
        if expired and not f.grants_due:  # due grants end it on the next op
            v.append(f"bucket {bid}: past expiry but not ended")
        acc_remaining[acc_id] = acc_remaining.get(acc_id, 0) + remaining
        acc_held[acc_id] = acc_held.get(acc_id, 0) + held
    accounts = zip(f.account_ids, f.balances, f.account_held, f.kinds, strict=True)
    for acc_id, balance, held, kind in accounts:
        if kind not in NEGATIVE_KINDS and balance < 0:
            v.append(f"account {acc_id}: negative balance {balance}")
        if not 0 <= held <= max(balance, 0):
            v.append(f"account {acc_id}: held {held} > balance {balance}")
        if kind in CUSTOMER_KINDS:
            rem, bheld = acc_remaining.get(acc_id, 0), acc_held.get(acc_id, 0)
            if (rem, bheld) != (balance, held):
                v.append(f"account {acc_id}: buckets {rem}/{bheld} != balance/held")
    leg_sum: dict[int, int] = {}
    scope_held: dict[str, int] = {}
    for hid, amount, legs, scopes, expires_ms in f.holds:
        if sum(a for _, a in legs) != amount:
            v.append(f"hold {hid}: legs do not add up to {amount}")
        for bucket_id, leg_nano in legs:
            leg_sum[bucket_id] = leg_sum.get(bucket_id, 0) + leg_nano
        for sc in scopes:
            scope_held[sc] = scope_held.get(sc, 0) + amount
        if expires_ms <= f.last_sweep_ms:
            v.append(f"hold {hid}: open past its expiry after a sweep")
    for bid, held in zip(f.bucket_ids, f.bucket_held, strict=True):
        if leg_sum.get(bid, 0) != held:
            v.append(f"bucket {bid}: held {held} != open legs {leg_sum.get(bid, 0)}")
    for scope, period, held, delegated, want in f.budgets:
        if held != scope_held.get(scope, 0):
            v.append(f"budget {scope}/{period}: held {held} != open holds")
        if delegated != want:
            v.append(f"budget {scope}/{period}: delegated {delegated} != {want}")
    return v


class Cut(NamedTuple):
    """The engine's figures at a commit, which the store is compared with."""

    facts: Facts  # what the in-memory invariants read, at the cut (checked off the loop)
    budgets: list[tuple[str, str, int, int]]  # (scope, period, spent, period start ms)
    now_ms: int


def capture(engine: Engine, now_ms: int) -> Cut:
    """The cut, taken while the writer holds the batch that ends at it: copies only (no
    check runs here, on the event loop); `cut_violations` checks them on a thread. A whole
    copy (O(accounts + buckets)): `slices.SlicedCopy.cut` is the check's, O(changes)."""
    return Cut(engine.facts(now_ms), budget_spends(engine, now_ms), now_ms)


def budget_spends(engine: Engine, now_ms: int) -> list[tuple[str, str, int, int]]:
    """Each budget's spend in its period, rolled to `now_ms` first (as `facts` needs)."""
    return [
        (b.scope, str(b.period), b.spent_nano, b.period_start_ms)
        for b in engine.all_budgets(now_ms)
    ]


def budgets_since_ms(cut: Cut) -> int:
    """The earliest period start the settled holds must be read from."""
    return min((b[3] for b in cut.budgets), default=cut.now_ms)


def cut_violations(cut: Cut, audit: AuditData, settled: list[tuple[str, int, int]]) -> list[str]:
    """The engine's invariants at the cut, then the store against it: safe on any thread."""
    return [*fact_violations(cut.facts), *store_violations(cut, audit, settled)]


def let_go(cut: Cut, audit: AuditData) -> None:
    """Empty the cut's and the audit's lists AUDIT_CHUNK_ROWS items a call; on the check's
    thread, once compared. Dropped whole on the loop (the check's last reference), a list of
    200,000 figures is freed in one call that holds the GIL: 45 ms measured for them all."""
    lists = [*cut.facts, *(getattr(audit, f.name) for f in fields(audit))]
    for col in lists:
        if type(col) is list:
            while col:
                del col[-AUDIT_CHUNK_ROWS:]


def chunked_dict(keys: list[int], values: list[int]) -> dict[int, int]:
    """`dict(zip(keys, values))`, AUDIT_CHUNK_ROWS entries a call: one call for 200,000
    holds the GIL (and so the event loop) for as long as it takes; between two calls the
    loop may run."""
    if len(keys) != len(values):
        raise ValueError("keys and values differ in length")
    out: dict[int, int] = {}
    for i in range(0, len(keys), AUDIT_CHUNK_ROWS):
        j = i + AUDIT_CHUNK_ROWS
        out.update(zip(keys[i:j], values[i:j], strict=True))
    return out


def store_violations(cut: Cut, audit: AuditData, settled: list[tuple[str, int, int]]) -> list[str]:
    """The store at the cut's commit against the engine at it: balances and buckets equal
    to their transfers and to memory, every settled hold charged its price, costs posted,
    no hold stored open, and each budget's spend equal to the holds settled in its period
    (`settled`: (scopes JSON, price, closed ms) since `budgets_since_ms`). Transfers that
    retention deleted count through the sums it kept (`expiry.py`, `AuditData`)."""
    violations: list[str] = []
    engine_balances = chunked_dict(cut.facts.account_ids, cut.facts.balances)
    engine_buckets = chunked_dict(cut.facts.bucket_ids, cut.facts.remaining)
    total = 0
    accounts = zip(audit.account_ids, audit.account_balances, audit.account_nets,
                   audit.account_periods, strict=True)  # fmt: skip
    for acc_id, stored, net, periods in accounts:
        total += stored
        if stored != net:
            violations.append(f"store account {acc_id}: balance {stored} != transfers {net}")
        if periods != net:  # what statements' opening balances are summed from
            violations.append(f"store account {acc_id}: period nets {periods} != transfers {net}")
        if engine_balances.get(acc_id) != stored:
            violations.append(
                f"store account {acc_id}: {stored} != engine {engine_balances.get(acc_id)}"
            )
    if total != 0:
        violations.append(f"store: sum of balances is {total}, not 0")
    # Week by week (`ledger_account_periods`): each account's period net = its dropped part
    # + its stored transfers of the week; every week's nets sum to 0, the weeks whose
    # transfers retention deleted included; nothing at or after the horizon was deleted.
    for acc_id, week_ms, net, counted in audit.weeks:
        violations.append(
            f"store account {acc_id}: week of {week_ms} ms period net {net} != transfers {counted}"
        )
    for week_ms, week_total in audit.unbalanced_weeks:
        violations.append(f"store: period nets of the week of {week_ms} ms sum to {week_total}")
    if audit.dropped_after_horizon:
        violations.append(
            f"store: {audit.dropped_after_horizon} sums of deleted transfers at or after the "
            f"horizon {audit.horizon_ms}"
        )
    buckets = zip(audit.bucket_ids, audit.bucket_remaining, audit.bucket_closed,
                  audit.bucket_nets, strict=True)  # fmt: skip
    for bucket_id, remaining, closed, net in buckets:
        if remaining != net:
            violations.append(f"store bucket {bucket_id}: {remaining} != transfers {net}")
        if closed and remaining:
            violations.append(f"store bucket {bucket_id}: closed with {remaining} left")
        if not closed and engine_buckets.get(bucket_id) != remaining:
            violations.append(f"store bucket {bucket_id}: {remaining} != engine")
    for hold_id, price, posted in audit.mischarged:
        violations.append(f"hold {hold_id}: price {price} but spend postings {posted}")
    if audit.bad_transfers:
        violations.append(f"{audit.bad_transfers} malformed transfers")
    posted, settled_cost = audit.costs
    if posted != settled_cost:
        violations.append(f"store: costs posted {posted} != settled holds' {settled_cost}")
    if audit.open_holds:  # holds are written once, closed
        violations.append(f"{len(audit.open_holds)} holds stored open")
    spent: dict[tuple[str, int], int] = {}
    starts: dict[str, set[int]] = {}
    for scope, _, _, start in cut.budgets:
        starts.setdefault(scope, set()).add(start)
    for scopes_json, price, closed_ms in settled:
        for s in json.loads(scopes_json):
            for start in starts.get(s, ()):
                if closed_ms >= start:
                    spent[(s, start)] = spent.get((s, start), 0) + price
    for scope, period, engine_spent, start in cut.budgets:
        want = spent.get((scope, start), 0)
        if engine_spent != want:
            violations.append(
                f"budget {scope}/{period}: spent {engine_spent} != settled {want} in period"
            )
    return violations
