"""The ledger's auditor: every invariant of the engine in memory, and the store against it.

Kept apart from the state machine (as TigerBeetle keeps `state_machine/auditor.zig`): the
engine applies operations, this module only reads and reports. Each function returns
violations as sentences; an empty list means sound.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NamedTuple

from tokenworks.ledger.domain import CUSTOMER_KINDS

if TYPE_CHECKING:
    from tokenworks.ledger.engine import Engine
    from tokenworks.ledger.store import AuditData


def engine_violations(engine: Engine, now_ms: int) -> list[str]:
    """Every in-memory invariant; call under the engine's lock with accrued costs posted."""
    v: list[str] = []
    total = sum(a.balance_nano for a in engine.accounts.values())
    if total != 0:
        v.append(f"sum of balances is {total}, not 0")
    per_acc: dict[int, list[int]] = {}
    for b in engine.buckets.values():
        if not 0 <= b.held_nano <= b.remaining_nano:
            v.append(f"bucket {b.id}: held {b.held_nano} outside [0, {b.remaining_nano}]")
        if b.ended and b.remaining_nano != b.held_nano:
            v.append(f"bucket {b.id}: ended with unheld credit")
        expired = b.expires_ms is not None and b.expires_ms <= now_ms and not b.ended
        if expired and not engine.grants_due(now_ms):  # due grants end it on the next op
            v.append(f"bucket {b.id}: past expiry but not ended")
        s = per_acc.setdefault(b.account_id, [0, 0])
        s[0] += b.remaining_nano
        s[1] += b.held_nano
    for a in engine.accounts.values():
        if not a.allow_negative and a.balance_nano < 0:
            v.append(f"account {a.id}: negative balance {a.balance_nano}")
        if not 0 <= a.held_nano <= max(a.balance_nano, 0):
            v.append(f"account {a.id}: held {a.held_nano} > balance {a.balance_nano}")
        if a.kind in CUSTOMER_KINDS:
            rem, held = per_acc.get(a.id, [0, 0])
            if (rem, held) != (a.balance_nano, a.held_nano):
                v.append(f"account {a.id}: buckets {rem}/{held} != balance/held")
    leg_sum: dict[int, int] = {}
    scope_held: dict[str, int] = {}
    for h in engine.holds.values():
        if sum(g.amount_nano for g in h.legs) != h.amount_nano:
            v.append(f"hold {h.id}: legs do not add up to {h.amount_nano}")
        for g in h.legs:
            leg_sum[g.bucket_id] = leg_sum.get(g.bucket_id, 0) + g.amount_nano
        for sc in h.scopes:
            scope_held[sc] = scope_held.get(sc, 0) + h.amount_nano
        if h.expires_ms <= engine.last_sweep_ms:
            v.append(f"hold {h.id}: open past its expiry after a sweep")
    for b in engine.buckets.values():
        if leg_sum.get(b.id, 0) != b.held_nano:
            v.append(f"bucket {b.id}: held {b.held_nano} != open legs {leg_sum.get(b.id, 0)}")
    for scope, per in engine.budgets.items():
        for bg in per.values():
            if bg.held_nano != scope_held.get(scope, 0):
                v.append(f"budget {scope}/{bg.period}: held {bg.held_nano} != open holds")
            want = 0 if bg.revoked else engine.children_unused(scope)
            if bg.delegated_nano != want:
                v.append(f"budget {scope}/{bg.period}: delegated {bg.delegated_nano} != {want}")
    return v


class Cut(NamedTuple):
    """The engine's figures at a commit, which the store is compared with."""

    violations: list[str]  # in memory, at the cut
    budgets: list[tuple[str, str, int, int]]  # (scope, period, spent, period start ms)
    accounts: dict[int, int]  # balance by account id
    buckets: dict[int, int]  # remaining credit by open bucket id
    now_ms: int


def capture(engine: Engine, now_ms: int) -> Cut:
    """The cut, taken while the writer holds the batch that ends at it."""
    budgets = [
        (b.scope, str(b.period), b.spent_nano, b.period_start_ms)
        for b in engine.all_budgets(now_ms)
    ]
    return Cut(
        engine.check(now_ms),
        budgets,
        {a.id: a.balance_nano for a in engine.accounts.values()},
        {b.id: b.remaining_nano for b in engine.buckets.values()},
        now_ms,
    )


def budgets_since_ms(cut: Cut) -> int:
    """The earliest period start the settled holds must be read from."""
    return min((b[3] for b in cut.budgets), default=cut.now_ms)


def store_violations(cut: Cut, audit: AuditData, settled: list[tuple[str, int, int]]) -> list[str]:
    """The store at the cut's commit against the engine at it: balances and buckets equal
    to their transfers and to memory, every settled hold charged its price, costs posted,
    no hold stored open, and each budget's spend equal to the holds settled in its period
    (`settled`: (scopes JSON, price, closed ms) since `budgets_since_ms`)."""
    violations: list[str] = []
    total = 0
    for acc_id, stored, net, periods in audit.accounts:
        total += stored
        if stored != net:
            violations.append(f"store account {acc_id}: balance {stored} != transfers {net}")
        if periods != net:  # what statements' opening balances are summed from
            violations.append(f"store account {acc_id}: period nets {periods} != transfers {net}")
        if cut.accounts.get(acc_id) != stored:
            violations.append(
                f"store account {acc_id}: {stored} != engine {cut.accounts.get(acc_id)}"
            )
    if total != 0:
        violations.append(f"store: sum of balances is {total}, not 0")
    for bucket_id, remaining, closed, net in audit.buckets:
        if remaining != net:
            violations.append(f"store bucket {bucket_id}: {remaining} != transfers {net}")
        if closed and remaining:
            violations.append(f"store bucket {bucket_id}: closed with {remaining} left")
        if not closed and cut.buckets.get(bucket_id) != remaining:
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
