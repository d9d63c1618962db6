"""The ledger's tables, declared once and rendered for SQLite and PostgreSQL.

Rows travel between the engine and the stores as tuples in these column orders, so both
stores write and load exactly the same shape. Booleans are 0/1 integers in both dialects.

The tables keep settled state only. What open holds reserve (held amounts, and the room a
delegated budget's open holds take from its parent) lives in memory and is derived again on
restore, where no hold is open: a hold is written once, when it closes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    key: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (name, "bigint" | WIDE | "text")
    upsert: bool = True  # False: insert-only, a conflict is ignored (immutable rows)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)


B, T = "bigint", "text"
# A running total that may pass int64: an account's balance (operator accounts accumulate
# lifetime totals), a bucket's remaining credit. Exact in both stores: PostgreSQL's NUMERIC,
# and SQLite's INTEGER column holding a value past int64 as a BLOB of its decimal digits
# (`store_sqlite.wide`), which SQLite stores as given (a text would become a lossy REAL).
# The name is PostgreSQL's type, so a batch's JSON casts to it as written.
WIDE = "numeric(39,0)"
WIDE_COLUMNS = (("ledger_accounts", "balance_nano"), ("ledger_buckets", "remaining_nano"))

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
)
IDEMPOTENCY = Table(
    "ledger_idempotency",
    ("key",),
    (("key", T), ("op", T), ("body_hash", T), ("result", T)),
    upsert=False,
)
META = Table("ledger_meta", ("k",), (("k", T), ("v", B)))

TABLES = (ACCOUNTS, BUCKETS, GRANTS, BUDGETS, HOLDS, TRANSFERS, IDEMPOTENCY, META)

INDEXES = (
    "CREATE INDEX IF NOT EXISTS ledger_transfers_debit ON ledger_transfers "
    "(debit_account_id, ts_ms)",
    "CREATE INDEX IF NOT EXISTS ledger_transfers_credit ON ledger_transfers "
    "(credit_account_id, ts_ms)",
    "CREATE INDEX IF NOT EXISTS ledger_holds_closed ON ledger_holds (closed_ms)",
    # Empty, since holds are written closed: it lets each open find rows an earlier version
    # left open (and audits confirm there are none) without reading the whole table.
    "CREATE INDEX IF NOT EXISTS ledger_holds_left_open ON ledger_holds (id) WHERE status = 'open'",
    # Retired: open holds are no longer stored, and only audits (full scans) group
    # transfers by hold. Each was one more B-tree insert per settled request.
    "DROP INDEX IF EXISTS ledger_holds_open",
    "DROP INDEX IF EXISTS ledger_transfers_hold",
)


def ddl(dialect: str) -> list[str]:
    """CREATE statements for `sqlite` or `postgres`."""
    types = {
        "sqlite": {B: "INTEGER", WIDE: "INTEGER", T: "TEXT"},
        "postgres": {B: "BIGINT", WIDE: "NUMERIC(39,0)", T: "TEXT"},
    }[dialect]
    out = []
    for t in TABLES:
        cols = ", ".join(f"{c} {types[ty]}" for c, ty in t.columns)
        # SQLite: a table keyed by text is a B-tree of rowids plus an index of keys; WITHOUT
        # ROWID makes it one B-tree, one insert fewer per row.
        clustered = dialect == "sqlite" and any(
            types[ty] == "TEXT" for c, ty in t.columns if c in t.key
        )
        out.append(
            f"CREATE TABLE IF NOT EXISTS {t.name} ({cols}, PRIMARY KEY ({', '.join(t.key)}))"
            + (" WITHOUT ROWID" if clustered else "")
        )
    out.extend(INDEXES)
    if dialect == "postgres":
        # Upgrade a ledger created when these were BIGINT (a no-op once they are NUMERIC).
        out.extend(
            f"DO $$ BEGIN IF (SELECT data_type FROM information_schema.columns "
            f"WHERE table_schema = current_schema() AND table_name = '{table}' "
            f"AND column_name = '{column}') = 'bigint' THEN "
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE NUMERIC(39,0); END IF; END $$"
            for table, column in WIDE_COLUMNS
        )
    return out
