"""The ledger's objects as table rows and back: what the writer commits and a restart loads.

Each table has a pair: `*_row` builds the row the store writes (a tuple in `schema.py`'s
column order, built by hand because it runs for every changed object of every batch), and
`*_from_row` reads one back by column name. A round trip of a sample row with a distinct
value in every column, at import, checks the pair against the schema, as the assertion
on `Transfer` checks that a transfer is its row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from tokenworks.db.table import Table
from tokenworks.ledger.domain import (
    Account,
    AccountKind,
    Bucket,
    Budget,
    Grant,
    Hold,
    HoldStatus,
    Period,
    Transfer,
)
from tokenworks.ledger.schema import ACCOUNTS, BUCKETS, BUDGETS, GRANTS, HOLDS, TRANSFERS

Row = tuple[Any, ...]

# Transfers go to the store as they are: the fields are the table's columns, in order.
assert Transfer._fields == TRANSFERS.column_names, (Transfer._fields, TRANSFERS.column_names)


@dataclass(slots=True)
class Batch:
    """One group commit: rows in `schema` column order, plus the op sequence they cover."""

    seq: int
    accounts: list[Row]
    buckets: list[Row]
    grants: list[Row]
    budgets: list[Row]
    holds: list[Row]
    transfers: list[Transfer]  # a Transfer is its row (asserted above)
    idempotency: list[Row]
    meta: list[tuple[str, int]]

    @classmethod
    def empty(cls, seq: int) -> Batch:
        return cls(seq, [], [], [], [], [], [], [], [])

    def is_empty(self) -> bool:
        return not (
            self.accounts
            or self.buckets
            or self.grants
            or self.budgets
            or self.holds
            or self.transfers
            or self.idempotency
            or self.meta
        )


@dataclass(slots=True)
class Snapshot:
    """The durable state a restart rebuilds from: settled state of open things only (no
    holds: none is open across a restart)."""

    accounts: list[Row]
    buckets: list[Row]
    grants: list[Row]
    budgets: list[Row]
    meta: dict[str, int]


def _named(table: Table, row: Row) -> dict[str, Any]:
    return dict(zip(table.column_names, row, strict=True))


def _json(value: Any) -> str:
    """Compact JSON text, as json.dumps(separators=(",", ":")) writes it, ~10x faster."""
    return _encode_json(value).decode()


_encode_json = msgspec.json.encode

# ---------------------------------------------------------------------- accounts


def account_row(a: Account) -> Row:
    return (
        a.id,
        a.name,
        a.parent_id,
        str(a.kind),
        int(a.draws_on_parent),
        a.created_ms,
        a.balance_nano,
    )


def account_from_row(r: Row) -> Account:
    d = _named(ACCOUNTS, r)
    return Account(
        id=d["id"],
        name=d["name"],
        parent_id=d["parent_id"],
        kind=AccountKind(d["kind"]),
        draws_on_parent=bool(d["draws_on_parent"]),
        created_ms=d["created_ms"],
        balance_nano=d["balance_nano"],
    )


# ---------------------------------------------------------------------- buckets


def bucket_row(b: Bucket, closed: bool) -> Row:
    return (
        b.id,
        b.account_id,
        b.grant_id,
        b.priority,
        b.expires_ms,
        b.created_seq,
        b.remaining_nano,
        int(b.ended),
        int(closed),
    )


def bucket_from_row(r: Row) -> tuple[Bucket, bool]:
    """The bucket and whether it is closed (a restart loads open ones only)."""
    d = _named(BUCKETS, r)
    bucket = Bucket(
        id=d["id"],
        account_id=d["account_id"],
        grant_id=d["grant_id"],
        priority=d["priority"],
        expires_ms=d["expires_ms"],
        created_seq=d["created_seq"],
        remaining_nano=d["remaining_nano"],
        ended=bool(d["ended"]),
    )
    return bucket, bool(d["closed"])


# ---------------------------------------------------------------------- grants


def grant_row(g: Grant) -> Row:
    return (
        g.id,
        g.account_id,
        g.amount_nano,
        g.priority,
        g.effective_ms,
        g.expires_ms,
        str(g.period) if g.period else None,
        g.tz,
        g.rollover_cap_nano,
        g.next_due_ms,
        g.bucket_id,
        int(g.active),
    )


def grant_from_row(r: Row) -> Grant:
    d = _named(GRANTS, r)
    return Grant(
        id=d["id"],
        account_id=d["account_id"],
        amount_nano=d["amount_nano"],
        priority=d["priority"],
        effective_ms=d["effective_ms"],
        expires_ms=d["expires_ms"],
        period=Period(d["period"]) if d["period"] else None,
        tz=d["tz"],
        rollover_cap_nano=d["rollover_cap_nano"],
        next_due_ms=d["next_due_ms"],
        bucket_id=d["bucket_id"],
        active=bool(d["active"]),
    )


# ---------------------------------------------------------------------- budgets


def budget_row(b: Budget) -> Row:
    return (
        b.scope,
        str(b.period),
        b.tz,
        b.limit_nano,
        b.spent_nano,
        b.period_start_ms,
        b.period_end_ms,
        b.parent_scope,
        b.expires_ms,
        int(b.revoked),
    )


def budget_from_row(r: Row) -> Budget:
    d = _named(BUDGETS, r)
    return Budget(
        scope=d["scope"],
        period=Period(d["period"]),
        tz=d["tz"],
        limit_nano=d["limit_nano"],
        spent_nano=d["spent_nano"],
        period_start_ms=d["period_start_ms"],
        period_end_ms=d["period_end_ms"],
        parent_scope=d["parent_scope"],
        expires_ms=d["expires_ms"],
        revoked=bool(d["revoked"]),
    )


# ---------------------------------------------------------------------- holds


def hold_row(h: Hold) -> Row:
    """A closed hold's row. Its legs (which buckets it reserved) are not kept: the transfers
    that settled it name their buckets, and a closed hold reserves nothing."""
    assert h.status is not HoldStatus.OPEN, h
    return (
        h.id,
        str(h.status),
        _json(h.chain),
        _json(h.scopes),
        h.amount_nano,
        h.created_ms,
        h.expires_ms,
        h.closed_ms,
        h.price_nano,
        h.cost_nano,
        h.clamped_nano,
        h.producer,
        h.model,
    )


def hold_from_row(r: Row) -> Hold:
    """A closed hold back from the store (to answer a retry of it)."""
    d = _named(HOLDS, r)
    return Hold(
        id=d["id"],
        status=HoldStatus(d["status"]),
        chain=tuple(json.loads(d["chain"])),
        scopes=tuple(json.loads(d["scopes"])),
        legs=(),
        amount_nano=d["amount_nano"],
        created_ms=d["created_ms"],
        expires_ms=d["expires_ms"],
        closed_ms=d["closed_ms"],
        price_nano=d["price_nano"],
        cost_nano=d["cost_nano"],
        clamped_nano=d["clamped_nano"],
        producer=d["producer"],
        model=d["model"],
    )


# ---------------------------------------------------------------------- the check


def _round_trips(table: Table, sample: Row, back: Callable[[Row], Row]) -> None:
    """Writing what was read gives the row again: `*_row` puts every value in its column."""
    assert len(sample) == len(table.columns), table.name
    assert len(set(map(repr, sample))) == len(sample), f"{table.name}: values must differ"
    assert back(sample) == sample, (table.name, back(sample), sample)


# Flags are 0/1, so the other numbers start at 2.
_round_trips(
    ACCOUNTS, (5, "a", 2, "organisation", 1, 3, 4), lambda r: account_row(account_from_row(r))
)
_round_trips(BUCKETS, (2, 3, 4, 5, 6, 7, 8, 0, 1), lambda r: bucket_row(*bucket_from_row(r)))
_round_trips(
    GRANTS,
    (2, 3, 4, 5, 6, 7, "day", "UTC", 8, 9, 10, 1),
    lambda r: grant_row(grant_from_row(r)),
)
_round_trips(
    BUDGETS,
    ("s", "week", "UTC", 2, 3, 4, 5, "p", 6, 1),
    lambda r: budget_row(budget_from_row(r)),
)
_round_trips(
    HOLDS,
    ("h", "settled", "[1]", '["s"]', 1, 2, 3, 4, 5, 6, 7, "p", "m"),
    lambda r: hold_row(hold_from_row(r)),
)
