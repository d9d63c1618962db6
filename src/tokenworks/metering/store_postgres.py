"""The usage table in PostgreSQL: the SQLite store's writer thread, over psycopg 3 (sync).

The writer thread owns one connection and commits each batch as one transaction of one
statement, `INSERT ... SELECT * FROM unnest(typed arrays) ON CONFLICT DO NOTHING`: a single
round trip for up to `MAX_BATCH_ROWS` rows. Reads (`query`, `records`) use a second,
autocommit connection behind a lock. A lost connection is reopened and the batch retried.

`?schema=NAME` in the URL puts the tables in that schema (created if missing), the same way
the ledger's store does (`tokenworks.db`), so tests and tenants can share one database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from tokenworks.db.postgres import REFUSED_SQLSTATE_CLASSES, connect
from tokenworks.metering.store import ADDED_COLUMNS, USAGE, USAGE_SCHEMA, UsageStore

WRITE_ATTEMPTS = 5
# Columns a table an earlier version created lacks (a no-op once they exist).
ADD_COLUMNS = [
    f"ALTER TABLE usage ADD COLUMN IF NOT EXISTS {name} {sql_type}"
    for name, sql_type in ADDED_COLUMNS
]


def _insert_sql() -> str:
    columns = ", ".join(name for name, _ in USAGE_SCHEMA)
    arrays = ", ".join(f"%s::{ty.lower()}[]" for _, ty in USAGE_SCHEMA)
    return (
        f"INSERT INTO usage ({columns}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (request_id) DO NOTHING"
    )


_FLOAT_COLUMNS = tuple(i for i, (_, ty) in enumerate(USAGE_SCHEMA) if ty == "DOUBLE PRECISION")


class PostgresUsageStore(UsageStore):
    """The usage table in PostgreSQL, with the same group-committing writer thread."""

    dialect = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Both connections open here, so a bad URL or a down server fails the constructor.
        self._write_conn = connect(url, [*USAGE.ddl("postgres"), *ADD_COLUMNS])
        self._read_conn = connect(url)
        self._read_lock = threading.Lock()
        self._insert_sql = _insert_sql()
        self._start()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        columns = [list(c) for c in zip(*rows, strict=True)]
        # A list's array type follows its first element: make latencies floats throughout.
        for i in _FLOAT_COLUMNS:
            columns[i] = [None if v is None else float(v) for v in columns[i]]
        for attempt in range(WRITE_ATTEMPTS):
            try:
                if self._write_conn.closed:
                    self._write_conn = connect(self.url)
                with self._write_conn.transaction():
                    self._write_conn.execute(self._insert_sql, columns)
                return
            except psycopg.OperationalError:
                # The connection broke (server restart, network): reopen it and retry.
                # The statement is idempotent (ON CONFLICT DO NOTHING), so a retry of a
                # commit whose answer was lost cannot write a row twice.
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                if not self._write_conn.closed and self._write_conn.broken:
                    self._write_conn.close()
                time.sleep(0.1 * (attempt + 1))

    def refuses(self, exc: BaseException) -> bool:
        # A data or constraint error (class 22 or 23), or a value psycopg cannot send.
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError | OverflowError | TypeError):
            return True
        state = getattr(exc, "sqlstate", None)
        return isinstance(exc, psycopg.Error) and str(state)[:2] in REFUSED_SQLSTATE_CLASSES

    def _fetch(self, sql: str, params: list[Any]) -> Sequence[Mapping[str, Any]]:
        with self._read_lock:
            if self._read_conn.closed or self._read_conn.broken:
                self._read_conn.close()
                self._read_conn = connect(self.url)
            return self._read_conn.execute(sql, params).fetchall()

    def _close_connections(self) -> None:
        self._write_conn.close()
        with self._read_lock:
            self._read_conn.close()


__all__ = ["PostgresUsageStore"]
