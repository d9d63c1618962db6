"""The ledger's tables, declared once and rendered for SQLite and PostgreSQL.

Rows travel between the engine and the stores as tuples in these column orders, so both
stores write and load exactly the same shape. Booleans are 0/1 integers in both dialects.

The tables keep settled state only. What open holds reserve (held amounts, and the room a
delegated budget's open holds take from its parent) lives in memory and is derived again on
restore, where no hold is open: a hold is written once, when it closes.
"""

from __future__ import annotations

from tokenworks.db.table import INT64 as B
from tokenworks.db.table import TEXT as T
from tokenworks.db.table import WIDE, Table

# WIDE columns are running totals that may pass int64 (operator accounts accumulate
# lifetime totals): exact in both stores (see db/table.py).

ACCOUNTS = Table(
    "ledger_accounts",
    ("id",),
    (
        ("id", B),
        ("name", T),
        ("parent_id", B),
        ("kind", T),
        ("draws_on_parent", B),
        ("created_ms", B),
        ("balance_nano", WIDE),
    ),
)
BUCKETS = Table(
    "ledger_buckets",
    ("id",),
    (
        ("id", B),
        ("account_id", B),
        ("grant_id", B),
        ("priority", B),
        ("expires_ms", B),
        ("created_seq", B),
        ("remaining_nano", WIDE),
        ("ended", B),
        ("closed", B),
    ),
)
GRANTS = Table(
    "ledger_grants",
    ("id",),
    (
        ("id", B),
        ("account_id", B),
        ("amount_nano", B),
        ("priority", B),
        ("effective_ms", B),
        ("expires_ms", B),
        ("period", T),
        ("tz", T),
        ("rollover_cap_nano", B),
        ("next_due_ms", B),
        ("bucket_id", B),
        ("active", B),
    ),
)
BUDGETS = Table(
    "ledger_budgets",
    ("scope", "period"),
    (
        ("scope", T),
        ("period", T),
        ("tz", T),
        ("limit_nano", B),
        ("spent_nano", B),
        ("period_start_ms", B),
        ("period_end_ms", B),
        ("parent_scope", T),
        ("expires_ms", B),
        ("revoked", B),
    ),
    without_rowid=True,
)
HOLDS = Table(
    "ledger_holds",
    ("id",),
    (
        ("id", T),
        ("status", T),
        ("chain", T),  # JSON [account ids], root first
        ("scopes", T),  # JSON [scope names]
        ("amount_nano", B),
        ("created_ms", B),
        ("expires_ms", B),
        ("closed_ms", B),
        ("price_nano", B),
        ("cost_nano", B),
        ("clamped_nano", B),
        ("producer", T),
        ("model", T),
    ),
    upsert=False,  # written once, closed: a closed hold is final
    indexes=("CREATE INDEX IF NOT EXISTS ledger_holds_closed ON ledger_holds (closed_ms)",),
    without_rowid=True,
)
TRANSFERS = Table(
    "ledger_transfers",
    ("id",),
    (
        ("id", B),
        ("ts_ms", B),
        ("kind", T),
        ("debit_account_id", B),
        ("credit_account_id", B),
        ("amount_nano", B),
        ("debit_bucket_id", B),
        ("credit_bucket_id", B),
        ("hold_id", T),
        ("model", T),
        ("producer", T),
    ),
    upsert=False,
    indexes=(
        "CREATE INDEX IF NOT EXISTS ledger_transfers_debit ON ledger_transfers "
        "(debit_account_id, ts_ms)",
        "CREATE INDEX IF NOT EXISTS ledger_transfers_credit ON ledger_transfers "
        "(credit_account_id, ts_ms)",
    ),
)
# Each account's net movement per fixed period (a week, epoch-aligned): the balance at a period's
# start is the sum of the periods before it, so a statement reads its own period's transfers
# plus a row per earlier week, never the account's whole history. Maintained in the same
# transaction as the transfers (a trigger on SQLite, a CTE of the batch statement on
# PostgreSQL), from the transfers actually inserted, so a retried batch cannot count twice.
PERIOD_MS = 7 * 86_400_000
ACCOUNT_PERIODS = Table(
    "ledger_account_periods",
    ("account_id", "period_start_ms"),
    (("account_id", B), ("period_start_ms", B), ("net_nano", WIDE)),
    without_rowid=True,
)
# SQLite: `xadd` (registered by the store) adds exactly, past int64 too; the plain sum is
# taken while both are int64 and cannot overflow (SQLite would turn it into a lossy REAL).
_SQLITE_NET = (
    "CASE WHEN typeof(net_nano) = 'integer' AND typeof(excluded.net_nano) = 'integer' "
    "AND ((excluded.net_nano >= 0 AND net_nano <= 9223372036854775807 - excluded.net_nano) "
    "OR (excluded.net_nano < 0 AND net_nano >= -9223372036854775808 - excluded.net_nano)) "
    "THEN net_nano + excluded.net_nano ELSE xadd(net_nano, excluded.net_nano) END"
)
SQLITE_PERIODS_TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS ledger_transfers_periods AFTER INSERT ON ledger_transfers
BEGIN
  INSERT INTO ledger_account_periods (account_id, period_start_ms, net_nano)
  VALUES (NEW.credit_account_id, NEW.ts_ms - NEW.ts_ms % {PERIOD_MS}, NEW.amount_nano)
  ON CONFLICT (account_id, period_start_ms) DO UPDATE SET net_nano = {_SQLITE_NET};
  INSERT INTO ledger_account_periods (account_id, period_start_ms, net_nano)
  VALUES (NEW.debit_account_id, NEW.ts_ms - NEW.ts_ms % {PERIOD_MS}, -NEW.amount_nano)
  ON CONFLICT (account_id, period_start_ms) DO UPDATE SET net_nano = {_SQLITE_NET};
END
"""

IDEMPOTENCY = Table(
    "ledger_idempotency",
    ("key",),
    (("key", T), ("op", T), ("body_hash", T), ("result", T)),
    upsert=False,
    without_rowid=True,
)
META = Table("ledger_meta", ("k",), (("k", T), ("v", B)), without_rowid=True)
# Closed holds past their retention, summed per UTC day of closing (cut where a lifetime
# budget starts), status and scopes (`compaction.py`): what check() still compares with the
# transfers once their rows are gone.
HOLDS_COMPACTED = Table(
    "ledger_holds_compacted",
    ("closed_ms", "status", "scopes"),
    (
        ("day", T),  # YYYY-MM-DD, of closed_ms
        ("status", T),
        ("scopes", T),  # the holds' scopes JSON, as ledger_holds had it
        # The first instant of the stretch the holds closed in: their UTC day, or the start
        # of a lifetime budget within it, so that a budget counts exactly the holds after it.
        ("closed_ms", B),
        ("holds", B),
        ("price_nano", B),
        ("cost_nano", B),
        ("clamped_nano", B),
    ),
    without_rowid=True,
)

TABLES = (
    ACCOUNTS, BUCKETS, GRANTS, BUDGETS, HOLDS, TRANSFERS, IDEMPOTENCY, META, HOLDS_COMPACTED,
    ACCOUNT_PERIODS,
)  # fmt: skip


def ddl(dialect: str) -> list[str]:
    """CREATE statements for `sqlite` or `postgres` (upgrades of older ledgers: upgrade.py)."""
    out = [stmt for t in TABLES for stmt in t.ddl(dialect)]
    return [*out, SQLITE_PERIODS_TRIGGER] if dialect == "sqlite" else out
