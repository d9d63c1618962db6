"""The ledger: exact credits, allowances, holds and budgets (see docs/ledger.md).

`Ledger.open(url)` gives the async facade; `Engine` is the pure state machine under it.
"""

from tokenworks.ledger.domain import (
    AccountKind,
    BalanceView,
    BeforeHorizon,
    HoldClosed,
    IdempotencyConflict,
    InvalidRequest,
    LedgerBusy,
    LedgerError,
    NotFound,
    Period,
    PolicyDenied,
    Recurrence,
    Refusal,
    Refused,
    Rollover,
    StoreUnavailable,
)
from tokenworks.ledger.engine import Engine, default_transfer_policy
from tokenworks.ledger.facade import AccountView, HoldView, Ledger

__all__ = [
    "AccountKind",
    "AccountView",
    "BalanceView",
    "BeforeHorizon",
    "Engine",
    "HoldClosed",
    "HoldView",
    "IdempotencyConflict",
    "InvalidRequest",
    "Ledger",
    "LedgerBusy",
    "LedgerError",
    "NotFound",
    "Period",
    "PolicyDenied",
    "Recurrence",
    "Refusal",
    "Refused",
    "Rollover",
    "StoreUnavailable",
    "default_transfer_policy",
]
