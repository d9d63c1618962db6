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
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

C = TypeVar("C")

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


class ReadPool(Generic[C]):
    """Up to `size` read connections, each used by one thread at a time, opened on demand:
    two admin reads run side by side instead of one waiting for the other's lock."""

    def __init__(
        self,
        open_conn: Callable[[], C],
        close_conn: Callable[[C], None],
        size: int,
        usable: Callable[[C], bool] = lambda _: True,
        first: C | None = None,
    ) -> None:
        """`first`: a connection already open (the store's, opened to fail fast on a bad
        URL), the pool's first."""
        self._open, self._close, self._usable = open_conn, close_conn, usable
        self._size = size
        self._free: list[C] = [] if first is None else [first]
        self._made = len(self._free)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def conn(self) -> Iterator[C]:
        with self._cond:
            # Bounded: each holder's read ends (under its own deadline) and hands one back.
            while not self._free and self._made >= self._size:
                self._cond.wait()
            conn = self._free.pop() if self._free else None
            if conn is None:
                self._made += 1
        if conn is None:
            try:
                conn = self._open()
            except BaseException:
                self._release(None)
                raise
        try:
            yield conn
        finally:
            if self._usable(conn):
                self._release(conn)
            else:  # broken: closed, and a fresh one opened when next needed
                self._discard(conn)
                self._release(None)

    def _discard(self, conn: C) -> None:
        with contextlib.suppress(Exception):
            self._close(conn)

    def _release(self, conn: C | None) -> None:
        with self._cond:
            if conn is None:
                self._made -= 1
            else:
                self._free.append(conn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            free, self._free = self._free, []
            self._made -= len(free)
        for conn in free:
            self._discard(conn)


def pg_timeout_ms(timeout_s: float) -> int:
    """`statement_timeout` in ms (0 would mean none: at least 1)."""
    return max(1, int(timeout_s * 1000))


__all__ = ["READ_TIMEOUT_S", "ReadPool", "ReadTimeout", "pg_timeout_ms", "sqlite_deadline"]
