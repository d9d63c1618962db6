"""Upgrades of a ledger an earlier version wrote, run by each store as it opens.

Each step is idempotent and a no-op on a ledger this version wrote, so a store runs them
all on every open, after creating the tables, before anything is loaded.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from tokenworks.db.table import WIDE
from tokenworks.ledger.schema import TABLES
from tokenworks.ledger.store import PERIOD_NETS, numbered

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("tokenworks.ledger")

INDEXES = (
    # Empty, since holds are written closed: it lets each open find rows an earlier version
    # left open (and audits confirm there are none) without reading the whole table.
    "CREATE INDEX IF NOT EXISTS ledger_holds_left_open ON ledger_holds (id) WHERE status = 'open'",
    # Retired: open holds are no longer stored, and only audits (full scans) group
    # transfers by hold. Each was one more B-tree insert per settled request.
    "DROP INDEX IF EXISTS ledger_holds_open",
    "DROP INDEX IF EXISTS ledger_transfers_hold",
)

# Balances and remaining credit were BIGINT before they were WIDE. SQLite's INTEGER column
# already holds both; PostgreSQL's needs the type changed (a no-op once it is NUMERIC).
WIDENED = tuple((t.name, c) for t in TABLES for c, ty in t.columns if ty == WIDE)

# The previous version wrote holds when they opened; after a crash, a database it left has
# open rows. They reserve nothing now (a restart rebuilds with nothing held), so they are
# closed as expired, and a late settle of one is refused rather than charged.
CLOSE_STORED_OPEN_HOLDS = (
    "UPDATE ledger_holds SET status = 'expired', closed_ms = :now WHERE status = 'open'"
)


# A ledger written before transfer retention has period rows without `dropped_nano`.
ADD_DROPPED_PG = (
    "ALTER TABLE ledger_account_periods ADD COLUMN IF NOT EXISTS dropped_nano NUMERIC(39,0) "
    "NOT NULL DEFAULT 0"
)
ADD_DROPPED_SQLITE = (
    "ALTER TABLE ledger_account_periods ADD COLUMN dropped_nano INTEGER NOT NULL DEFAULT 0"
)


def statements(dialect: str) -> list[str]:
    """The schema upgrades for `sqlite` or `postgres`."""
    out = list(INDEXES)
    if dialect == "postgres":
        out.append(ADD_DROPPED_PG)
        out.extend(
            f"DO $$ BEGIN IF (SELECT data_type FROM information_schema.columns "
            f"WHERE table_schema = current_schema() AND table_name = '{table}' "
            f"AND column_name = '{column}') = 'bigint' THEN "
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE NUMERIC(39,0); END IF; END $$"
            for table, column in WIDENED
        )
    return out


def _closed(count: int) -> int:
    if count:
        log.warning("closed %d holds an earlier version stored open", count)
    return count


# A ledger written before ledger_account_periods has transfers and no period rows (this
# version writes a period row with every transfer): its nets are computed once, on open.
NEEDS_PERIODS = (
    "SELECT EXISTS (SELECT 1 FROM ledger_transfers) "
    "AND NOT EXISTS (SELECT 1 FROM ledger_account_periods)"
)
INSERT_PERIOD = (
    "INSERT INTO ledger_account_periods (account_id, period_start_ms, net_nano) VALUES (?, ?, ?)"
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _sqlite_wide(value: int | str) -> int | bytes:
    v = int(value)
    return v if INT64_MIN <= v <= INT64_MAX else str(v).encode()


def upgrade_sqlite(conn: sqlite3.Connection, now_ms: int) -> int:
    """Run every upgrade on a SQLite ledger; returns how many stored open holds it closed.
    The connection must have `xsum` (the store's connections do)."""
    for stmt in statements("sqlite"):
        conn.execute(stmt)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(ledger_account_periods)")}
    if "dropped_nano" not in columns:
        conn.execute(ADD_DROPPED_SQLITE)
    if conn.execute(NEEDS_PERIODS).fetchone()[0]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(PERIOD_NETS.replace("XSUM(", "xsum(")).fetchall()
            conn.executemany(INSERT_PERIOD, [(a, p, _sqlite_wide(n)) for a, p, n in rows])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.warning("computed %d account-period nets of a ledger from before them", len(rows))
    return _closed(conn.execute(CLOSE_STORED_OPEN_HOLDS, {"now": now_ms}).rowcount)


async def upgrade_postgres(conn: asyncpg.Connection, now_ms: int) -> int:
    """The same on PostgreSQL, inside the caller's transaction."""
    for stmt in statements("postgres"):
        await conn.execute(stmt)
    if await conn.fetchval(NEEDS_PERIODS):
        await conn.execute(
            "INSERT INTO ledger_account_periods (account_id, period_start_ms, net_nano) "
            + PERIOD_NETS.replace("XSUM(", "SUM(")
        )
    text, args = numbered(CLOSE_STORED_OPEN_HOLDS, {"now": now_ms})
    status = await conn.execute(text, *args)  # "UPDATE <n>"
    return _closed(int(status.split()[-1]))
