"""The usage table in PostgreSQL: the SQLite store's writer thread, over psycopg 3 (sync).

The writer thread owns one connection and commits each batch as one transaction of one
statement, `INSERT ... SELECT * FROM unnest(typed arrays) ON CONFLICT DO NOTHING`: a single
round trip for up to `MAX_BATCH_ROWS` rows. Reads (`query`, `records`) use a small pool of
autocommit connections (`db.reads.ReadPool`). A lost connection is reopened and the batch retried.

`?schema=NAME` in the URL puts the tables in that schema (created if missing), the same way
the ledger's store does (`tokenworks.db`), so tests and tenants can share one database.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from tokenworks.db.postgres import REFUSED_SQLSTATE_CLASSES, connect
from tokenworks.db.reads import ReadPool, ReadTimeout, pg_timeout_ms
from tokenworks.metering.store import READERS, USAGE, USAGE_SCHEMA, UsageStore

WRITE_ATTEMPTS = 5


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
        self._write_conn = connect(url, USAGE.ddl("postgres"))
        self._readers: ReadPool[psycopg.Connection[dict[str, Any]]] = ReadPool(
            lambda: connect(self.url),
            lambda c: c.close(),
            READERS,
            usable=lambda c: not (c.closed or c.broken),  # a broken one is replaced
            first=connect(url),
        )
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

    def _fetch(
        self, sql: str, params: list[Any], timeout_s: float | None
    ) -> Sequence[Mapping[str, Any]]:
        with self._readers.conn() as conn:
            if timeout_s is None:
                return conn.execute(sql, params).fetchall()
            try:
                with conn.transaction():
                    # SET LOCAL: the limit ends with this read's transaction.
                    limit = str(pg_timeout_ms(timeout_s))
                    conn.execute("SELECT set_config('statement_timeout', %s, true)", (limit,))
                    return conn.execute(sql, params).fetchall()
            except psycopg.errors.QueryCanceled as exc:
                raise ReadTimeout(timeout_s) from exc

    def _close_connections(self) -> None:
        self._write_conn.close()
        self._readers.close()


__all__ = ["PostgresUsageStore"]
