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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tokenworks.ledger.domain import LedgerError
from tokenworks.ledger.engine import Batch, Snapshot
from tokenworks.ledger.schema import ddl
from tokenworks.ledger.store import (
    AUDIT_ACCOUNTS,
    AUDIT_BAD_TRANSFERS,
    AUDIT_BUCKETS,
    AUDIT_COSTS,
    AUDIT_MISCHARGED,
    AUDIT_OPEN_HOLDS,
    BATCH_TABLES,
    EXPIRE_STORED_OPEN_HOLDS,
    GET_HOLD,
    GET_IDEMPOTENCY,
    LOAD_QUERIES,
    MOVEMENTS,
    NET_BEFORE,
    RECENT_CLOSED_HOLDS,
    SETTLED_SCOPES,
    Attachment,
    AuditData,
    upsert_tail,
)

R = TypeVar("R")


def sqlite_path(url: str) -> str:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` or `sqlite://:memory:`."""
    rest = url.removeprefix("sqlite://")
    if rest in ("", ":memory:", "/:memory:"):
        return ":memory:"
    return rest[1:] if rest.startswith("/") else rest


class SqliteStore:
    dialect = "sqlite"
    # A commit here costs the gateway's core a thread hand-off, a transaction and an fsync,
    # whatever it carries: sharing one among more settlements is cheaper.
    linger_s = 0.002

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._insert_sql = {
            name: (
                f"INSERT INTO {t.name} ({', '.join(t.column_names)}) "
                f"VALUES ({', '.join('?' for _ in t.columns)})" + upsert_tail(t, "excluded")
            )
            for t, name in BATCH_TABLES
        }

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LedgerError(f"another process has the ledger {self.path} open") from None
            self._lock_fd = fd
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        for stmt in ddl("sqlite"):
            conn.execute(stmt)
        self._conn = conn

    async def close(self) -> None:
        await self._run(self._close_sync)
        self._pool.shutdown(wait=True)

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
                if rows:
                    c.executemany(self._insert_sql[name], rows)
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

    def _all(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql, params or {}).fetchall()]

    async def load(self) -> Snapshot | None:
        return await self._run(self._load_sync)

    def _load_sync(self) -> Snapshot | None:
        rows = {name: self._all(sql) for name, sql in LOAD_QUERIES.items()}
        if not rows["accounts"]:
            return None
        return Snapshot(
            accounts=rows["accounts"],
            buckets=rows["buckets"],
            grants=rows["grants"],
            budgets=rows["budgets"],
            meta={k: v for k, v in rows["meta"]},
        )

    async def expire_stored_open_holds(self, now_ms: int) -> int:
        def run() -> int:
            return self.conn.execute(EXPIRE_STORED_OPEN_HOLDS, {"now": now_ms}).rowcount

        return int(await self._run(run))

    async def get_hold(self, hold_id: str) -> tuple[Any, ...] | None:
        rows = await self._run(self._all, GET_HOLD, {"id": hold_id})
        return rows[0] if rows else None

    async def recent_closed_holds(self, limit: int) -> list[tuple[Any, ...]]:
        return await self._run(self._all, RECENT_CLOSED_HOLDS, {"limit": limit})

    async def get_idempotency(self, key: str) -> tuple[str, str, str] | None:
        rows = await self._run(self._all, GET_IDEMPOTENCY, {"key": key})
        return rows[0] if rows else None  # type: ignore[return-value]

    async def audit(self) -> AuditData:
        def run() -> AuditData:
            return AuditData(
                accounts=self._all(AUDIT_ACCOUNTS),  # type: ignore[arg-type]
                buckets=self._all(AUDIT_BUCKETS),  # type: ignore[arg-type]
                mischarged=self._all(AUDIT_MISCHARGED),  # type: ignore[arg-type]
                bad_transfers=self._all(AUDIT_BAD_TRANSFERS)[0][0],
                costs=self._all(AUDIT_COSTS)[0],  # type: ignore[arg-type]
                open_holds=[r[0] for r in self._all(AUDIT_OPEN_HOLDS)],
            )

        return await self._run(run)

    async def settled_scopes(self, since_ms: int, until_ms: int) -> list[tuple[str, int, int]]:
        return await self._run(self._all, SETTLED_SCOPES, {"since": since_ms, "until": until_ms})

    async def movements(
        self, account_id: int, since_ms: int, until_ms: int
    ) -> list[tuple[str, int, str | None, int, str | None]]:
        params = {"acc": account_id, "since": since_ms, "until": until_ms}
        return await self._run(self._all, MOVEMENTS, params)

    async def net_before(self, account_id: int, until_ms: int) -> int:
        rows = await self._run(self._all, NET_BEFORE, {"acc": account_id, "until": until_ms})
        return int(rows[0][0])
