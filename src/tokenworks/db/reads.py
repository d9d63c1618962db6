"""Reads with a time limit: admin queries, statements and reports must never hang a caller.

Every long read (a usage summary over a year, a statement) runs off the event loop, on a
read connection of its own, under a deadline: on SQLite a timer interrupts the
statement past it, PostgreSQL's `statement_timeout` cancels it on the server. Either way the
caller gets `ReadTimeout`, which the API answers as a 503 in its own shape, never a hang.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator

# Default limit of one admin read (usage query, statement).
READ_TIMEOUT_S = 30.0


class ReadTimeout(Exception):
    """A read ran past its time limit and was stopped (nothing was changed)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(
            f"the query ran past its time limit of {timeout_s:g} s and was stopped; "
            "narrow it (since/until, a key) or try again later"
        )


@contextlib.contextmanager
def sqlite_deadline(conn: sqlite3.Connection, timeout_s: float | None) -> Iterator[None]:
    """Run the block's statements on `conn` under a deadline; past it they raise
    `ReadTimeout` (SQLite's "interrupted").

    A timer calls `Connection.interrupt` (thread-safe, meant for this) at the deadline. Not
    the progress handler: that calls back into Python every few thousand instructions, and
    each call takes the GIL from the event loop, which a long read would then slow down."""
    if timeout_s is None:
        yield
        return
    timer = threading.Timer(timeout_s, conn.interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            raise ReadTimeout(timeout_s) from exc
        raise
    finally:
        timer.cancel()


def pg_timeout_ms(timeout_s: float) -> int:
    """`statement_timeout` in ms (0 would mean none: at least 1)."""
    return max(1, int(timeout_s * 1000))


__all__ = ["READ_TIMEOUT_S", "ReadTimeout", "pg_timeout_ms", "sqlite_deadline"]
