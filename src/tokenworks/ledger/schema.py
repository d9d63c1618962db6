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
    columns: tuple[tuple[str, str], ...]  # (name, "bigint" | "text")
    upsert: bool = True  # False: insert-only, a conflict is ignored (immutable rows)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)


B, T = "bigint", "text"

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
        ("balance_nano", B),
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
        ("remaining_nano", B),
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
    types = {"sqlite": {B: "INTEGER", T: "TEXT"}, "postgres": {B: "BIGINT", T: "TEXT"}}[dialect]
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
    return out
