"""The PostgreSQL usage table partitioned by month, so retention drops a month at once.

A new database gets `usage` as `PARTITION BY RANGE (ts_ms)` with one partition per UTC month
(`usage_pYYYYMM`) and a DEFAULT partition. The usage writer creates the current and the next
month before a row needs them (`ensure`), so the default partition stays empty in normal
operation; it is there so that a row of a month nobody created yet (the ledger's commit
writes usage rows too, and a clock may jump) is kept, never refused. When a month is created
while the default partition holds rows of it, they are moved into it in the same transaction.

A partitioned table's unique key must hold the partition column, so the key is
(request_id, ts_ms): a retried write of a record carries its time and is still ignored.

An existing unpartitioned `usage` keeps working as it is (retention deletes its rows in
batches); docs/retention.md says how to move it to partitions.

The helpers take the table's name: the ledger's `ledger_transfers` is partitioned the same
way (`ledger_transfers_pYYYYMM`, `ledger_transfers_default`; `ledger/expiry.py`).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import psycopg

from tokenworks.db.postgres import DDL_LOCK_ID

log = logging.getLogger(__name__)

DEFAULT = "usage_default"


def partitioned_ddl(columns: tuple[tuple[str, str], ...], not_null: set[str]) -> list[str]:
    """CREATE statements for a partitioned `usage` (if missing) and its default partition."""
    cols = ", ".join(f"{c} {ty}" + (" NOT NULL" if c in not_null else "") for c, ty in columns)
    return [
        f"CREATE TABLE IF NOT EXISTS usage ({cols}, PRIMARY KEY (request_id, ts_ms))"
        " PARTITION BY RANGE (ts_ms)",
        f"CREATE TABLE IF NOT EXISTS {DEFAULT} PARTITION OF usage DEFAULT",
    ]


def month_start_ms(ms: int) -> int:
    d = dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp()) * 1000


def next_month_ms(ms: int) -> int:
    """The start of the month after the one holding `ms`."""
    d = dt.datetime.fromtimestamp(month_start_ms(ms) // 1000, dt.UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return int(dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()) * 1000


def name_of(month_ms: int, table: str = "usage") -> str:
    d = dt.datetime.fromtimestamp(month_ms // 1000, dt.UTC)
    return f"{table}_p{d.year:04d}{d.month:02d}"


def start_of(name: str) -> int:
    """The first instant of a partition named `<table>_pYYYYMM`."""
    year, month = int(name[-6:-2]), int(name[-2:])
    return int(dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()) * 1000


def is_partitioned(conn: psycopg.Connection[Any], table: str = "usage") -> bool:
    row = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (table,)
    ).fetchone()
    return row is not None and _first(row) == "p"


def months(conn: psycopg.Connection[Any], table: str = "usage") -> list[str]:
    """The monthly partitions, oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (table,),
    ).fetchall()
    prefix = f"{table}_p"
    return sorted(n for n in map(_first, rows) if n.startswith(prefix) and n[-6:].isdigit())


def ensure(
    conn: psycopg.Connection[Any],
    through_ms: int,
    from_ms: int,
    table: str = "usage",
    lock_timeout_ms: int | None = None,
) -> int:
    """Create the monthly partitions from the month of `from_ms` through the month of
    `through_ms` that do not exist yet; returns the end of the last one. Each is made in
    its own transaction, taking any rows of its month the default partition holds.

    `lock_timeout_ms`: for a table another connection inserts into (the ledger's writer).
    The parent is then locked against inserts first: an insert routed to the default
    partition before the ATTACH and written after it would break the default partition's
    new constraint (a check violation, which the writer takes for a refused row). Past the
    timeout the month is not made (psycopg's LockNotAvailable): rows wait in the default
    partition meanwhile."""
    default = f"{table}_default"
    month = month_start_ms(from_ms)
    while month <= through_ms:
        end = next_month_ms(month)
        name = name_of(month, table)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_ID,))
            if _first(conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()) is None:
                if lock_timeout_ms is not None:
                    conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                    conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
                # No row may enter the default partition while its rows of this month move.
                conn.execute(f"LOCK TABLE {default} IN SHARE ROW EXCLUSIVE MODE")
                conn.execute(
                    f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                )
                moved = conn.execute(
                    f"WITH m AS (DELETE FROM {default} WHERE ts_ms >= %s AND ts_ms < %s"
                    f" RETURNING *) INSERT INTO {name} SELECT * FROM m",
                    (month, end),
                ).rowcount
                conn.execute(
                    f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({month})"
                    f" TO ({end})"
                )
                if moved:
                    log.warning("%s: moved %d rows from %s into %s", table, moved, default, name)
        month = end
    return month


def drop(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop one monthly partition (its rows are rolled up and past retention)."""
    assert name.startswith("usage_p") and name[7:].isdigit(), name
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


__all__ = ["DEFAULT", "drop", "ensure", "is_partitioned", "months", "partitioned_ddl"]
