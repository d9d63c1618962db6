"""The usage table in PostgreSQL: the SQLite store's writer thread, over psycopg 3 (sync).

The writer thread owns one connection and commits each batch as one transaction of one
statement, `INSERT ... SELECT * FROM unnest(typed arrays) ON CONFLICT DO NOTHING`: a single
round trip for up to `MAX_BATCH_ROWS` rows. Reads (`query`, `records`) use a small pool of
autocommit connections (`db.reads.ReadPool`). A lost connection is reopened and the batch retried.

`?schema=NAME` in the URL puts the tables in that schema (created if missing), the same way
the ledger's store does (`tokenworks.db`), so tests and tenants can share one database.

A new database's `usage` is partitioned by month (`partitions.py`); the writer creates the
next month's partition before a row needs it. An older, unpartitioned `usage` is used as it
is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from tokenworks.db.postgres import REFUSED_SQLSTATE_CLASSES, connect
from tokenworks.db.reads import ReadPool, ReadTimeout, pg_timeout_ms
from tokenworks.metering import partitions, rollup
from tokenworks.metering.store import (
    READERS,
    USAGE,
    USAGE_SCHEMA,
    UsageStore,
    fetch_yielding,
    upgrade_sql,
)

WRITE_ATTEMPTS = 5
PARTITION_LOCK_TIMEOUT_MS = 1_000  # what the ledger's commits may queue behind a new month
log = logging.getLogger(__name__)


def _insert_sql() -> str:
    columns = ", ".join(name for name, _ in USAGE_SCHEMA)
    arrays = ", ".join(f"%s::{ty.lower()}[]" for _, ty in USAGE_SCHEMA)
    return (
        f"INSERT INTO usage ({columns}) SELECT * FROM unnest({arrays}) "
        # No conflict target: the key is (request_id, ts_ms) on a partitioned table and
        # request_id on an older one; either way a repeat of a row is ignored.
        "ON CONFLICT DO NOTHING"
    )


def ddl() -> list[str]:
    """A partitioned `usage` for a new database (an existing table is kept as it is), its
    indexes, and the roll-up tables."""
    not_null = {c for c, rule in USAGE.constraints if rule == "NOT NULL"}
    table, default = partitions.partitioned_ddl(USAGE_SCHEMA, not_null)
    only_if_partitioned = (
        "DO $$ BEGIN IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('usage')) = 'p'"
        f" THEN {default}; END IF; END $$"
    )
    return [table, only_if_partitioned, *USAGE.indexes, *rollup.ddl("postgres")]


_FLOAT_COLUMNS = tuple(i for i, (_, ty) in enumerate(USAGE_SCHEMA) if ty == "DOUBLE PRECISION")


class PostgresUsageStore(UsageStore):
    """The usage table in PostgreSQL, with the same group-committing writer thread."""

    dialect = "postgres"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Both connections open here, so a bad URL or a down server fails the constructor.
        self._write_conn = connect(url, [*ddl(), *upgrade_sql("postgres")])
        self._readers: ReadPool[psycopg.Connection[dict[str, Any]]] = ReadPool(
            lambda: connect(self.url),
            lambda c: c.close(),
            READERS,
            usable=lambda c: not (c.closed or c.broken),  # a broken one is replaced
            first=connect(url),
        )
        self._insert_sql = _insert_sql()
        self.partitioned = partitions.is_partitioned(self._write_conn)
        self._partitions_until_ms = 0  # every month before this has its partition
        self._ensure_partitions(int(time.time() * 1000))
        self._start()

    def _ensure_partitions(self, now_ms: int) -> None:
        """Make this month's and the next month's partitions, if not made yet: the next
        month's exists a month before its first row."""
        if not self.partitioned:
            return
        through_ms = partitions.next_month_ms(now_ms)
        if through_ms < self._partitions_until_ms:
            return
        try:
            # The parent locked first, as the ledger's months are: the ledger's commits
            # insert usage rows too, and one routed to the default partition before an
            # ATTACH and written after it would be refused.
            self._partitions_until_ms = partitions.ensure(
                self._write_conn, through_ms, now_ms, lock_timeout_ms=PARTITION_LOCK_TIMEOUT_MS
            )
        except psycopg.errors.LockNotAvailable:
            log.info("usage store: usage is busy; its next partition is made on a later batch")
        except Exception:
            # Rows of a month without its partition land in the default one, never lost;
            # the next batch tries again.
            log.exception("usage store: could not create the partitions through %d", through_ms)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        columns = [list(c) for c in zip(*rows, strict=True)]
        # Through next month by the clock, not the rows' times: a row from far ahead goes to
        # the default partition rather than make a partition for every month up to it.
        self._ensure_partitions(int(time.time() * 1000))
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
                return fetch_yielding(conn.execute(sql, params))
            try:
                with conn.transaction():
                    # SET LOCAL: the limit ends with this read's transaction.
                    limit = str(pg_timeout_ms(timeout_s))
                    conn.execute("SELECT set_config('statement_timeout', %s, true)", (limit,))
                    return fetch_yielding(conn.execute(sql, params))
            except psycopg.errors.QueryCanceled as exc:
                raise ReadTimeout(timeout_s) from exc

    def _close_connections(self) -> None:
        self._write_conn.close()
        self._readers.close()


__all__ = ["PostgresUsageStore"]
