"""The usage table in PostgreSQL: the SQLite store's writer thread, over psycopg 3 (sync).

The writer thread owns one connection and commits each batch as one transaction of one
statement, `INSERT ... SELECT * FROM unnest(typed arrays) ON CONFLICT DO NOTHING`: a single
round trip for up to `MAX_BATCH_ROWS` rows. Reads (`query`, `records`) use a second,
autocommit connection behind a lock. A lost connection is reopened and the batch retried.

`?schema=NAME` in the URL puts the tables in that schema (created if missing), the same way
the ledger's store does, so tests and tenants can share one database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from tokenworks.ledger.store_postgres import split_schema
from tokenworks.metering.store import USAGE_DDL, USAGE_SCHEMA, UsageStore

CONNECT_TIMEOUT_S = 10
WRITE_ATTEMPTS = 5
# Serialises concurrent first opens of one database (CREATE ... IF NOT EXISTS races).
DDL_LOCK_ID = 7413


def connect(
    url: str, ddl: str | None = None, *, autocommit: bool = True
) -> psycopg.Connection[DictRow]:
    """A psycopg connection for a `postgresql://...[?schema=NAME]` URL, its search_path set
    to the schema (created if missing), with `ddl` applied under an advisory lock."""
    conninfo, schema = split_schema(url)
    options = f"-c search_path={schema}" if schema else None
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        row_factory=dict_row,
        options=options,  # psycopg drops a None parameter
    )
    try:
        if schema or ddl:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_ID,))
                if schema:
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                for stmt in (ddl or "").split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
    return conn


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
        self._write_conn = connect(url, USAGE_DDL)
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


__all__ = ["PostgresUsageStore", "connect"]
