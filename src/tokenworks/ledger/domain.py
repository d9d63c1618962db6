"""Ledger vocabulary: accounts, buckets, grants, budgets, holds, transfers and their errors.

Amounts are integer nano-units (1e-9 of the ledger currency) and times are integer
milliseconds since the epoch, UTC. Nothing here does I/O; the engine owns the behaviour.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

import msgspec

MAX_AMOUNT_NANO = 2**62
"""Largest amount any single operation accepts: leaves BIGINT head-room for sums."""

MAX_TIME_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the latest time the ledger takes (a datetime's last year)."""

MAX_BACKDATE_MS = 400 * 86_400_000
"""How far back a grant's `effective_at` may go: enough to migrate a year of allowances, and
few enough periods (400 daily ones at most) that issuing them all stays a few milliseconds
of the event loop."""

NO_EXPIRY_MS = 2**62
"""Sort key for buckets that never expire (consumed after every expiring one)."""

CASH_PRIORITY = 2**31
"""Cash (top-ups, transfers in) is spent after every grant."""


class AccountKind(StrEnum):
    ORGANISATION = "organisation"
    TEAM = "team"
    USER = "user"
    AGENT = "agent"
    # Operator accounts: the other side of every customer movement.
    TOPUPS = "topups"  # source of paid credit (goes negative by what customers bought)
    GRANTS = "grants"  # source of allowances (goes negative by what was granted)
    REVENUE = "revenue"  # what customers spent
    EXPENSE = "expense"  # cost of goods: source of producer payables
    PAYABLE = "payable"  # what we owe one producer
    EXPIRED = "expired"  # breakage: credit that expired unspent


CUSTOMER_KINDS = frozenset(
    {AccountKind.ORGANISATION, AccountKind.TEAM, AccountKind.USER, AccountKind.AGENT}
)
NEGATIVE_KINDS = frozenset({AccountKind.TOPUPS, AccountKind.GRANTS, AccountKind.EXPENSE})
"""Operator accounts that are sources and so run negative; every other account stays >= 0."""


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"


class TransferKind(StrEnum):
    TOP_UP = "top_up"
    GRANT = "grant"  # first issue of a grant
    REFILL = "refill"  # a recurring grant's new period
    ROLLOVER = "rollover"  # carried credit, old bucket -> new bucket of one account
    EXPIRE = "expire"
    TRANSFER = "transfer"
    SPEND = "spend"  # consumer -> revenue, per hold leg
    COST = "cost"  # expense -> producer payable


class HoldStatus(StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    VOIDED = "voided"
    EXPIRED = "expired"


# --------------------------------------------------------------------------- errors


class LedgerError(Exception):
    """Base of every ledger error. Raised bare, it means the ledger cannot act now (closed,
    or another process owns the store): a later retry may succeed."""


class Refusal(StrEnum):
    """Why the ledger refused a hold or a delegation: a closed set, like TigerBeetle's result
    codes, so callers branch on a value rather than parse a string."""

    CREDIT = "credit"  # the funding chain has less available than asked
    BUDGET = "budget"  # a budget of the scope has less room this period (`Refused.period`)
    REVOKED = "revoked"  # the scope's delegated budget was revoked
    EXPIRED = "expired"  # the scope's delegated budget has expired


class Refused(LedgerError):
    """A hold (or delegation) the ledger will not place: a money answer, not an outage.

    `scope` is "account:<id>" or "key:<id>"; `reason` says which limit; `period` is the
    budget's period when `reason` is BUDGET.
    """

    def __init__(
        self,
        scope: str,
        reason: Refusal,
        needed_nano: int,
        available_nano: int,
        *,
        period: Period | None = None,
        note: str = "",
    ) -> None:
        self.scope = scope
        self.note = note  # what to do about it, when the figures alone would mislead
        self.reason = Refusal(reason)
        self.period = period
        self.needed_nano = needed_nano
        self.available_nano = available_nano
        kind, _, ident = scope.partition(":")
        self.account_id: int | None = int(ident) if kind == "account" else None
        self.key_id: str | None = ident if kind == "key" else None
        super().__init__(self.message)

    @property
    def limit_kind(self) -> str:
        """ "credit", "budget:<period>", "revoked" or "expired" (the reason, and the period)."""
        if self.reason is Refusal.BUDGET:
            return f"budget:{self.period}"
        return str(self.reason)

    @property
    def what(self) -> str:
        if self.reason is Refusal.CREDIT:
            return "insufficient credit"
        if self.reason is Refusal.BUDGET:
            return f"{self.period} budget {'too small' if self.available_nano > 0 else 'exhausted'}"
        return str(self.reason)

    def describe(self, needs: str, available: str) -> str:
        """The one sentence every refusal is told in; callers choose how amounts read."""
        note = f"; {self.note}" if self.note else ""
        return f"{self.what} on {self.scope}: {needs}, {available} available{note}"

    @property
    def message(self) -> str:
        return self.describe(f"needs {self.needed_nano} nano", f"{self.available_nano} nano")


class LedgerBusy(LedgerError):
    """Backpressure: the writer is too far behind to take another hold now. Not a money
    answer: the same request succeeds once the writer catches up (answered 503, Retry-After)."""


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before with a different body."""


class NotFound(LedgerError):
    pass


class HoldClosed(LedgerError):
    """Settle/void/extend of a hold that is no longer open (settled, voided or expired)."""

    def __init__(self, hold_id: str, status: str) -> None:
        self.hold_id = hold_id
        self.status = status
        super().__init__(f"hold {hold_id} is {status}")


class PolicyDenied(LedgerError):
    """The transfer policy refused a movement."""


class InvalidRequest(LedgerError):
    pass


class BeforeHorizon(InvalidRequest):
    """A statement from before the transfers' retention horizon: its opening balance is
    still exact, but its movements were deleted (the monthly export holds them)."""

    param = "since"

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        when = datetime.fromtimestamp(horizon_ms / 1000, UTC).isoformat().replace("+00:00", "Z")
        super().__init__(
            f"'since' is before the ledger's retention horizon {when}: transfers before it "
            "were deleted (retention.transfers_days); statements start at it or later, and "
            "the export (`tokenworks export --month`) holds the earlier ones"
        )


class StoreUnavailable(LedgerError):
    """The store failed past its retries; the ledger stops accepting writes."""


# --------------------------------------------------------------------------- scopes


def account_scope(account_id: int) -> str:
    return f"account:{account_id}"


def key_scope(key_id: str) -> str:
    return f"key:{key_id}"


def scope_name(scope: int | str | tuple[str, str]) -> str:
    """Normalise the accepted scope spellings: 7, ("key", "k1"), "key:k1", "account:7"."""
    if isinstance(scope, bool):
        raise InvalidRequest(f"bad scope {scope!r}")
    if isinstance(scope, int):
        return account_scope(scope)
    if isinstance(scope, tuple) and len(scope) == 2 and scope[0] in ("key", "account"):
        return f"{scope[0]}:{scope[1]}"
    if isinstance(scope, str) and scope.partition(":")[0] in ("key", "account"):
        return scope
    raise InvalidRequest(f"bad scope {scope!r}")


# --------------------------------------------------------------------------- grant rules


@dataclass(frozen=True, slots=True)
class Recurrence:
    """A grant that refills every period, at the period boundary in `tz`."""

    period: Period
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if self.period is Period.TOTAL:
            raise InvalidRequest("a recurring grant needs day, week or month")


@dataclass(frozen=True, slots=True)
class Rollover:
    """What happens to a recurring grant's unspent credit at its period's end.

    `cap_nano=0` expires all of it; `None` carries all of it; otherwise up to the cap.
    """

    cap_nano: int | None = 0

    @classmethod
    def expire(cls) -> Rollover:
        return cls(0)

    @classmethod
    def up_to(cls, cap_nano: int | None) -> Rollover:
        return cls(cap_nano)


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class Account:
    id: int
    name: str
    parent_id: int | None
    kind: AccountKind
    draws_on_parent: bool
    created_ms: int
    balance_nano: int = 0
    held_nano: int = 0
    # Open buckets in consumption order (customer accounts only).
    bucket_ids: list[int] = field(default_factory=list)
    cash_bucket_id: int | None = None

    @property
    def allow_negative(self) -> bool:
        return self.kind in NEGATIVE_KINDS

    @property
    def available_nano(self) -> int:
        return self.balance_nano - self.held_nano

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "parent_id": self.parent_id,
            "kind": str(self.kind),
            "draws_on_parent": self.draws_on_parent,
        }


@dataclass(slots=True)
class Bucket:
    """One source of credit inside an account: its cash, or one period of one grant."""

    id: int
    account_id: int
    grant_id: int | None
    priority: int
    expires_ms: int | None
    created_seq: int
    remaining_nano: int = 0
    held_nano: int = 0
    ended: bool = False  # past its expiry: only the held part is left, released to expiry

    @property
    def order_key(self) -> tuple[int, int, int]:
        """Consumption order: priority, then earliest expiry, then oldest."""
        exp = NO_EXPIRY_MS if self.expires_ms is None else self.expires_ms
        return (self.priority, exp, self.created_seq)


@dataclass(slots=True)
class Grant:
    id: int
    account_id: int
    amount_nano: int
    priority: int
    effective_ms: int
    expires_ms: int | None  # the end of the whole grant (recurring: no refill after)
    period: Period | None  # None: one-off
    tz: str
    rollover_cap_nano: int | None
    next_due_ms: int | None  # next issue / roll / expiry; None when finished
    bucket_id: int | None = None  # current bucket
    active: bool = True


@dataclass(slots=True)
class Budget:
    """A spending limit on one scope for one period, independent of the balance.

    `delegated_nano` is the unspent part of the live delegated budgets minted from this
    scope: it stays reserved here until the child spends it (then it is `spent`), or the
    child is revoked or expires (then it returns).
    """

    scope: str
    period: Period
    tz: str
    limit_nano: int
    spent_nano: int = 0
    held_nano: int = 0
    delegated_nano: int = 0
    period_start_ms: int = 0
    period_end_ms: int | None = None
    parent_scope: str | None = None  # set on delegated budgets
    expires_ms: int | None = None
    revoked: bool = False

    @property
    def room_nano(self) -> int:
        return self.limit_nano - self.spent_nano - self.held_nano - self.delegated_nano

    @property
    def unused_nano(self) -> int:
        """What a delegated budget still reserves in its parent."""
        return max(0, self.limit_nano - self.spent_nano - self.held_nano)

    def public(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "period": str(self.period),
            "tz": self.tz,
            "limit_nano": self.limit_nano,
            "spent_nano": self.spent_nano,
            "held_nano": self.held_nano,
            "delegated_nano": self.delegated_nano,
            "room_nano": self.room_nano,
            "period_start_ms": self.period_start_ms,
            "period_end_ms": self.period_end_ms,
            "parent_scope": self.parent_scope,
            "expires_ms": self.expires_ms,
            "revoked": self.revoked,
        }


class HoldLeg(NamedTuple):
    bucket_id: int
    account_id: int
    amount_nano: int


@dataclass(slots=True)
class Hold:
    """A two-phase reservation for one request; `id` is the request id."""

    id: str
    chain: tuple[int, ...]
    scopes: tuple[str, ...]  # every budget scope it counts against (accounts, then keys)
    amount_nano: int
    legs: Sequence[HoldLeg]  # while open; () once closed
    created_ms: int
    expires_ms: int
    status: HoldStatus = HoldStatus.OPEN
    closed_ms: int | None = None
    price_nano: int = 0
    cost_nano: int = 0
    producer: str | None = None
    model: str | None = None
    clamped_nano: int = 0  # price asked above the hold, not charged
    available_after_nano: int = 0  # funding left on the chain just after the hold

    def body_hash(self) -> str:
        return body_hash(
            {"chain": list(self.chain), "scopes": list(self.scopes), "amount": self.amount_nano}
        )

    def settle_hash(self) -> str:
        return body_hash(
            {
                "status": str(self.status),
                "price": self.price_nano + self.clamped_nano,
                "cost": self.cost_nano,
                "producer": self.producer,
                "model": self.model,
            }
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": str(self.status),
            "amount_nano": self.amount_nano,
            "price_nano": self.price_nano,
            "cost_nano": self.cost_nano,
            "clamped_nano": self.clamped_nano,
            "expires_ms": self.expires_ms,
            "available_after_nano": self.available_after_nano,
        }


class Transfer(NamedTuple):
    """One posting, immutable once made (a named tuple: made per settlement, and several
    times cheaper to build than a frozen dataclass)."""

    id: int
    ts_ms: int
    kind: TransferKind
    debit_account_id: int
    credit_account_id: int
    amount_nano: int
    debit_bucket_id: int | None = None
    credit_bucket_id: int | None = None
    hold_id: str | None = None
    model: str | None = None
    producer: str | None = None


@dataclass(frozen=True, slots=True)
class BalanceView:
    """What the gateway shows: `available_nano` goes in the remaining-balance header."""

    account_id: int
    balance_nano: int
    held_nano: int
    available_nano: int
    chain_available_nano: int  # what a hold on this account could draw, parents included
    spent_this_period_nano: dict[str, int]  # per budget period of this account


def body_hash(body: dict[str, Any]) -> str:
    """Stable digest of an operation's arguments, to tell a retry from a conflicting reuse."""
    raw = _encode_sorted(body)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


# Sorted keys make the encoding canonical; msgspec does it ~10x faster than json.dumps, and
# this runs several times per request on the hot path.
_encode_sorted = msgspec.json.Encoder(order="sorted", enc_hook=str).encode


def check_text(value: str, what: str) -> None:
    """Text the ledger stores must be storable everywhere: PostgreSQL's text (and jsonb)
    cannot hold NUL, and one such row would fail its whole group commit."""
    if "\x00" in value:
        raise InvalidRequest(f"{what} must not contain NUL characters")


def check_time(ms: int, what: str) -> None:
    """A time the ledger will store: an int ms in [1970, 9999]."""
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_TIME_MS:
        raise InvalidRequest(f"{what} must be a time between 1970 and 9999")


def check_amount(amount_nano: int, *, allow_zero: bool = False) -> None:
    if not isinstance(amount_nano, int) or isinstance(amount_nano, bool):
        raise InvalidRequest(f"amounts are int nano-units, got {type(amount_nano).__name__}")
    low = 0 if allow_zero else 1
    if not low <= amount_nano <= MAX_AMOUNT_NANO:
        raise InvalidRequest(f"amount {amount_nano} out of range")
