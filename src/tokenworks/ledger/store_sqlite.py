"""The embedded store: one SQLite file in WAL mode, written by one thread.

`synchronous=FULL` makes every commit durable (one WAL fsync per batch, which group commit
amortises over many requests). An exclusive lock file stops a second process from opening
the same ledger, since the engine in memory is the authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from tokenworks.db import sqlite as db_sqlite
from tokenworks.db import sqlite_path
from tokenworks.db.reads import sqlite_deadline
from tokenworks.db.sqlite import REFUSALS
from tokenworks.db.table import WIDE
from tokenworks.ledger.domain import BeforeHorizon, LedgerError
from tokenworks.ledger.rows import Batch, Snapshot
from tokenworks.ledger.schema import ddl
from tokenworks.ledger.store import (
    AUDIT_QUERIES,
    AUDIT_ROWS,
    BATCH_TABLES,
    GET_HOLD,
    GET_HORIZON,
    GET_IDEMPOTENCY,
    LOAD_QUERIES,
    MOVEMENTS,
    NET_BEFORE,
    RECENT_CLOSED_HOLDS,
    SETTLED_SCOPES,
    Attachment,
    AuditData,
    AuditReader,
    StatementData,
    net_before_params,
    net_of,
    upsert_tail,
)
from tokenworks.ledger.upgrade import upgrade_sqlite

R = TypeVar("R")
Ts = TypeVarTuple("Ts")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
READERS = 2  # read connections (and threads) for statements and reports


def wide(row: tuple[Any, ...], columns: tuple[int, ...]) -> tuple[Any, ...]:
    """The row with each value past int64 in a WIDE column as the BLOB of its decimal digits:
    SQLite keeps a BLOB as given (it would turn such a text into a lossy REAL), and `exact`
    reads it back."""
    out = list(row)
    for i in columns:
        v = out[i]
        if type(v) is int and not INT64_MIN <= v <= INT64_MAX:
            out[i] = str(v).encode()
    return tuple(out)


class ExactSum:
    """`xsum(x)`: SQLite's SUM raises on int64 overflow; this sums exactly, BLOB digits
    included, and gives a total past int64 as its decimal text."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: Any) -> None:
        if value is not None:
            self.total += value if type(value) is int else int(value)

    def finalize(self) -> int | str:
        t = self.total
        return t if INT64_MIN <= t <= INT64_MAX else str(t)


def exact_add(a: Any, b: Any) -> int | bytes:
    """`xadd(a, b)`: a + b exactly, values past int64 in and out as BLOB digits (see `wide`).
    Called only when the plain sum would overflow (ledger_account_periods' trigger)."""
    t = sum(0 if v is None else v if type(v) is int else int(v) for v in (a, b))
    return t if INT64_MIN <= t <= INT64_MAX else str(t).encode()


def sql(text: str) -> str:
    return text.replace("XSUM(", "xsum(")


def connect(path: str) -> sqlite3.Connection:
    conn = db_sqlite.connect(path)
    conn.create_aggregate("xsum", 1, ExactSum)  # type: ignore[arg-type]
    conn.create_function("xadd", 2, exact_add, deterministic=True)
    return conn


def read_statement(
    conn: sqlite3.Connection, account_id: int, since_ms: int, until_ms: int, timeout_s: float | None
) -> StatementData:
    """A statement's three reads in one read transaction: one snapshot, so its lines add up
    however busy the writer is."""
    with sqlite_deadline(conn, timeout_s):
        conn.execute("BEGIN")
        try:
            horizon = conn.execute(GET_HORIZON).fetchone()
            if horizon is not None and since_ms < horizon[0]:
                raise BeforeHorizon(horizon[0])
            q = sql(NET_BEFORE)
            opening = net_of(conn.execute(q, net_before_params(account_id, since_ms)).fetchone())
            closing = net_of(conn.execute(q, net_before_params(account_id, until_ms)).fetchone())
            params = {"acc": account_id, "since": since_ms, "until": until_ms}
            moves = [tuple(r) for r in conn.execute(MOVEMENTS, params).fetchall()]
        finally:
            conn.execute("ROLLBACK")
    return opening, closing, moves


def read_audit(conn: sqlite3.Connection) -> AuditData:
    """The audit, the per-account and per-bucket rows AUDIT_CHUNK_ROWS at a time: each
    `fetchmany` holds the GIL only while it builds that many tuples (SQLite's own work
    releases it), and they are freed before the next."""
    reader = AuditReader({k: conn.execute(sql(q)).fetchall() for k, q in AUDIT_QUERIES.items()})
    for name, q in AUDIT_ROWS.items():
        cursor = conn.execute(sql(q))
        while chunk := cursor.fetchmany(reader.chunk_rows):
            reader.take(name, chunk)
    return reader.data


def exact_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A loaded row with WIDE values stored as BLOB digits as ints (only they are BLOBs)."""
    if bytes not in map(type, row):
        return row
    return tuple(int(v) if type(v) is bytes else v for v in row)


class SqliteSnapshot:
    """A read transaction on a connection of its own (and a thread of its own): in WAL mode
    it sees the database as of its first read, whatever the writer commits after.

    An in-memory database has no second connection: its snapshot reads everything at once,
    while the writer waits."""

    def __init__(self, path: str, main: SqliteStore) -> None:
        self.path = path
        self.main = main
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._audit: AuditData | None = None
        self._settled: list[tuple[str, int, int]] = []

    async def _run(self, fn: Callable[[*Ts], R], *args: *Ts) -> R:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def begin(self) -> None:
        if self.path == ":memory:":

            def read_all() -> tuple[AuditData, list[tuple[str, int, int]]]:
                settled = self.main._all(SETTLED_SCOPES, {"since": INT64_MIN, "until": INT64_MAX})
                return read_audit(self.main.conn), settled

            self._audit, self._settled = await self.main._run(read_all)
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-audit")

        def begin() -> None:
            conn = connect(self.path)
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM ledger_meta").fetchall()  # the snapshot is now
            self._conn = conn

        await self._run(begin)

    async def audit(self) -> AuditData:
        if self._conn is None:
            assert self._audit is not None
            return self._audit
        return await self._run(read_audit, self._conn)

    async def settled_scopes(self, since_ms: int, until_ms: int) -> list[tuple[str, int, int]]:
        if self._conn is None:
            return [r for r in self._settled if since_ms <= r[2] < until_ms]
        conn = self._conn
        params = {"since": since_ms, "until": until_ms}

        def run() -> list[tuple[str, int, int]]:
            return [tuple(r) for r in conn.execute(SETTLED_SCOPES, params).fetchall()]

        return await self._run(run)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._run(conn.close)  # closing ends the read transaction
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class SqliteStore:
    dialect = "sqlite"
    # A commit here costs the gateway's core a thread hand-off, a transaction and an fsync,
    # whatever it carries: sharing one among more settlements is cheaper.
    linger_s = 0.002

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        # Statements and reports read here, each thread on its own WAL read connection: never
        # on the writer's thread, where they would delay every group commit behind them.
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="ledger-read")
        self._reader = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Where the WIDE columns are in each batch table's rows.
        self._wide = {
            name: tuple(i for i, (_, ty) in enumerate(t.columns) if ty == WIDE)
            for t, name in BATCH_TABLES
        }
        self._insert_sql = {
            name: (
                f"INSERT INTO {t.name} ({', '.join(t.column_names)}) "
                f"VALUES ({', '.join('?' for _ in t.columns)})" + upsert_tail(t, "excluded")
            )
            for t, name in BATCH_TABLES
        }

    async def _run(self, fn: Callable[[*Ts], R], *args: *Ts) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ lifecycle

    async def open(self, now_ms: int) -> None:
        await self._run(self._open_sync, now_ms)

    def _open_sync(self, now_ms: int) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LedgerError(f"another process has the ledger {self.path} open") from None
            self._lock_fd = fd
        conn = connect(self.path)
        db_sqlite.use_wal(conn, synchronous="FULL", busy_timeout_ms=10_000)
        db_sqlite.create(conn, ddl("sqlite"))
        upgrade_sqlite(conn, now_ms)
        self._conn = conn

    async def close(self) -> None:
        await self._run(self._close_sync)
        self._pool.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    # ------------------------------------------------------------------ writes

    async def write(self, batch: Batch, attached: Sequence[Attachment] = ()) -> None:
        await self._run(self._write_sync, batch, attached)

    def _write_sync(self, batch: Batch, attached: Sequence[Attachment]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for _, name in BATCH_TABLES:
                rows = getattr(batch, name)
                if not rows:
                    continue
                try:
                    c.executemany(self._insert_sql[name], rows)
                except OverflowError:
                    # A running total past int64 (rare: free on the common path). Rows
                    # written before the one that overflowed are upserted again, alike.
                    if not (cols := self._wide[name]):
                        raise
                    c.executemany(self._insert_sql[name], [wide(r, cols) for r in rows])
            for table, columns, rows in attached:
                names = ", ".join(name for name, _ in columns)
                marks = ", ".join("?" for _ in columns)
                sql = f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING"
                c.executemany(sql, rows)
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ reads

    def _all(self, text: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql(text), params or {}).fetchall()]

    def refuses(self, exc: BaseException) -> bool:
        return isinstance(exc, REFUSALS)

    async def load(self) -> Snapshot | None:
        return await self._run(self._load_sync)

    def _load_sync(self) -> Snapshot | None:
        rows = {name: [exact_row(r) for r in self._all(q)] for name, q in LOAD_QUERIES.items()}
        if not rows["accounts"]:
            return None
        return Snapshot(
            accounts=rows["accounts"],
            buckets=rows["buckets"],
            grants=rows["grants"],
            budgets=rows["budgets"],
            meta={k: v for k, v in rows["meta"]},
        )

    async def get_hold(self, hold_id: str) -> tuple[Any, ...] | None:
        rows = await self._run(self._all, GET_HOLD, {"id": hold_id})
        return rows[0] if rows else None

    async def recent_closed_holds(self, limit: int) -> list[tuple[Any, ...]]:
        return await self._run(self._all, RECENT_CLOSED_HOLDS, {"limit": limit})

    async def get_idempotency(self, key: str) -> tuple[str, str, str] | None:
        rows = await self._run(self._all, GET_IDEMPOTENCY, {"key": key})
        return rows[0] if rows else None

    async def snapshot(self) -> SqliteSnapshot:
        snap = SqliteSnapshot(self.path, self)
        try:
            await snap.begin()
        except BaseException:
            await snap.close()
            raise
        return snap

    def _read_conn(self) -> sqlite3.Connection:
        """This reader thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._reader, "conn", None)
        if conn is None:
            conn = self._reader.conn = connect(self.path)
            conn.execute("PRAGMA busy_timeout=10000")
            self._reader_conns.append(conn)
        return conn

    async def statement_data(
        self, account_id: int, since_ms: int, until_ms: int, timeout_s: float | None
    ) -> StatementData:
        if self.path == ":memory:":  # no second connection sees it: the writer's thread reads
            return await self._run(
                read_statement, self.conn, account_id, since_ms, until_ms, timeout_s
            )

        def run() -> StatementData:
            return read_statement(self._read_conn(), account_id, since_ms, until_ms, timeout_s)

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)
