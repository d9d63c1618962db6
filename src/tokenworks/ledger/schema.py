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
# `dropped_nano`: the part of the net whose transfers retention has deleted (`expiry.py`),
# added in the transaction that deletes them; so for every week, kept or not,
# net_nano = dropped_nano + the net of the week's transfers still stored.
ACCOUNT_PERIODS = Table(
    "ledger_account_periods",
    ("account_id", "period_start_ms"),
    (("account_id", B), ("period_start_ms", B), ("net_nano", WIDE), ("dropped_nano", WIDE)),
    constraints=(("dropped_nano", "NOT NULL DEFAULT 0"),),
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

# What retention (`expiry.py`) keeps of the transfers it deletes, written in the transaction
# that deletes them: each bucket's net of its deleted transfers, and per week and kind the
# amount and count deleted (what the spend and cost checks add to the rows left).
BUCKET_BASES = Table("ledger_bucket_bases", ("bucket_id",), (("bucket_id", B), ("net_nano", WIDE)))
TRANSFERS_DROPPED = Table(
    "ledger_transfers_dropped",
    ("period_start_ms", "kind"),
    (("period_start_ms", B), ("kind", T), ("amount_nano", WIDE), ("transfers", B)),
    without_rowid=True,
)
# ledger_meta keys the retention job writes (the engine never writes them): every transfer
# from the horizon on is kept (a week boundary; statements start there at the earliest),
# and every week before the verified mark was proved against its period rows before any of
# its transfers went.
HORIZON_KEY = "transfers_horizon_ms"
VERIFIED_KEY = "transfers_verified_ms"

TABLES = (
    ACCOUNTS, BUCKETS, GRANTS, BUDGETS, HOLDS, TRANSFERS, IDEMPOTENCY, META, HOLDS_COMPACTED,
    ACCOUNT_PERIODS, BUCKET_BASES, TRANSFERS_DROPPED,
)  # fmt: skip

# PostgreSQL: a new database's transfers are partitioned by month of ts_ms (like usage:
# `metering/partitions.py`), so retention drops a month as one partition. The key must hold
# the partition column: (id, ts_ms); a retried batch carries its transfers' times, so its
# repeats still conflict. An existing, unpartitioned table is kept as it is.
TRANSFERS_DEFAULT = "ledger_transfers_default"


def _transfers_partitioned_ddl() -> list[str]:
    cols = ", ".join(f"{c} {ty.upper()}" for c, ty in TRANSFERS.columns)
    return [
        f"CREATE TABLE IF NOT EXISTS ledger_transfers ({cols}, PRIMARY KEY (id, ts_ms))"
        " PARTITION BY RANGE (ts_ms)",
        "DO $$ BEGIN IF (SELECT relkind FROM pg_class WHERE oid = "
        "to_regclass('ledger_transfers')) = 'p' THEN CREATE TABLE IF NOT EXISTS "
        f"{TRANSFERS_DEFAULT} PARTITION OF ledger_transfers DEFAULT; END IF; END $$",
        *TRANSFERS.indexes,
    ]


def ddl(dialect: str) -> list[str]:
    """CREATE statements for `sqlite` or `postgres` (upgrades of older ledgers: upgrade.py)."""
    if dialect == "sqlite":
        out = [stmt for t in TABLES for stmt in t.ddl(dialect)]
        return [*out, SQLITE_PERIODS_TRIGGER]
    out = [stmt for t in TABLES if t is not TRANSFERS for stmt in t.ddl(dialect)]
    return [*out, *_transfers_partitioned_ddl()]
