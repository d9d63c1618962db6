"""SQLite connections as every store opens them: WAL, autocommit, shared across threads."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

# Errors that say a value of a batch cannot be stored (so the same rows fail again), as
# opposed to the database being unavailable (sqlite3.OperationalError: I/O, full, locked).
# OverflowError: an int past int64, refused by the driver before SQLite sees it;
# InterfaceError/ProgrammingError: a value of a type it cannot bind, or a row of the wrong
# length; TypeError/ValueError: the same, raised by Python while binding.
REFUSALS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    OverflowError,
    TypeError,
    ValueError,
)


def connect(path: str, *, timeout_s: float = 5.0) -> sqlite3.Connection:
    """A connection in autocommit mode (stores BEGIN their own transactions), usable from
    the store's own thread whichever thread made it; the file's folder is created."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)


def use_wal(conn: sqlite3.Connection, *, synchronous: str, busy_timeout_ms: int) -> None:
    """WAL mode (readers never block the writer). `synchronous`: FULL makes each commit
    durable (the ledger); NORMAL syncs at checkpoints (usage and keys)."""
    assert synchronous in ("FULL", "NORMAL"), synchronous
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


def create(conn: sqlite3.Connection, statements: Iterable[str]) -> None:
    """Run DDL statements (each `IF NOT EXISTS`, so every open may run them)."""
    for stmt in statements:
        conn.execute(stmt)


def connect_rows(path: str, statements: Iterable[str]) -> sqlite3.Connection:
    """A connection for a store of plain rows (usage, keys): rows as `sqlite3.Row`, WAL with
    NORMAL sync, a 30 s wait for the lock, and `statements` (DDL) run."""
    conn = connect(path, timeout_s=30)
    conn.row_factory = sqlite3.Row
    use_wal(conn, synchronous="NORMAL", busy_timeout_ms=30_000)
    create(conn, statements)
    return conn
