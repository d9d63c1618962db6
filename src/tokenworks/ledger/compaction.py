"""Compact closed holds past their retention into per-day sums, in bounded batches.

A closed hold's row (`ledger_holds`) is read back only by the last 100,000 closed holds a
restarted engine remembers, by `get_hold` for a retried request id, and by `check()`. Past
the retention its row is replaced by its share of one `ledger_holds_compacted` row per UTC
day of closing (cut where a lifetime budget starts), status and scopes JSON: hold count,
prices, costs, clamped amounts. Each
batch moves at most `batch_holds` holds in one transaction (sums added, rows deleted), so a
check sees the holds either as rows or as sums, never both or neither.

What `check()` can still prove afterwards (docs/design.md, "Retention"): balances and
buckets against the transfers (untouched), costs posted against settled holds' costs (the
compacted sums count), every budget's spend against the settled holds of its period (a
TOTAL budget counts the compacted sums; a day, week or month budget's period is never
compacted, since the retention is at least `MIN_HOLDS_DAYS`), and the compacted holds'
prices against the spend transfers left without a hold row, in aggregate: a single
compacted hold charged wrongly while another is off by the opposite amount is no longer
seen.

Runs on a connection of its own (sqlite3 or psycopg), off the event loop: the ledger's
writer only inserts holds, never touches an old one, so the two never write the same row.
"""

from __future__ import annotations

import bisect
import contextlib
import sqlite3
from typing import Any

from tokenworks.db import backend, job_transaction, sqlite_path
from tokenworks.ledger.schema import HOLDS_COMPACTED

DAY_MS = 86_400_000
# A month budget's period starts at most 31 days and a time zone's 14 hours before now: holds
# older than this are in no open period but a TOTAL one.
MIN_HOLDS_DAYS = 35
BATCH_HOLDS = 5_000

_SUMS = ("holds", "price_nano", "cost_nano", "clamped_nano")


class HoldCompactor:
    """Moves closed holds past the retention into `ledger_holds_compacted`."""

    def __init__(self, url: str) -> None:
        self.dialect = "sqlite" if backend(url) == "sqlite" else "postgres"
        self.ph = "?" if self.dialect == "sqlite" else "%s"
        ddl = HOLDS_COMPACTED.ddl(self.dialect)
        self._conn: Any
        if self.dialect == "sqlite":
            from tokenworks.db import sqlite as db_sqlite

            conn = db_sqlite.connect(sqlite_path(url), timeout_s=30)
            db_sqlite.use_wal(conn, synchronous="FULL", busy_timeout_ms=30_000)
            db_sqlite.create(conn, ddl)
            self._conn = conn
        else:
            from psycopg.rows import tuple_row

            from tokenworks.db.postgres import connect

            self._conn = connect(url, ddl)
            self._conn.row_factory = tuple_row

    def close(self) -> None:
        self._conn.close()

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return job_transaction(self._conn)

    def _has_holds_table(self) -> bool:
        if self.dialect == "sqlite":
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_holds'"
        else:
            sql = "SELECT 1 WHERE to_regclass('ledger_holds') IS NOT NULL"
        return self._conn.execute(sql).fetchone() is not None

    def compact(
        self,
        before_ms: int,
        now_ms: int,
        batch_holds: int = BATCH_HOLDS,
        max_batches: int = 100,
    ) -> int:
        """Compact the holds closed before `before_ms` (never later than `MIN_HOLDS_DAYS`
        before `now_ms`), at most `max_batches` transactions; returns the holds compacted."""
        before_ms = min(before_ms, now_ms - MIN_HOLDS_DAYS * DAY_MS)
        if not self._has_holds_table():
            return 0
        # Where lifetime budgets start (day, week and month periods are younger than any
        # compacted hold). Read once, outside the batches' transactions: a budget made
        # meanwhile starts now, after every hold old enough to be compacted.
        cuts = sorted(
            int(r[0])
            for r in self._conn.execute(
                "SELECT DISTINCT period_start_ms FROM ledger_budgets WHERE period = 'total'"
            ).fetchall()
        )
        done = 0
        for _ in range(max_batches):
            n = self._batch(before_ms, batch_holds, cuts)
            done += n
            if n < batch_holds:
                break
        return done

    def _batch(self, before_ms: int, limit: int, cuts: list[int]) -> int:
        ph = self.ph
        with self._tx():
            rows = self._conn.execute(
                "SELECT id, status, scopes, closed_ms, price_nano, cost_nano, clamped_nano"
                f" FROM ledger_holds WHERE closed_ms < {ph} ORDER BY closed_ms LIMIT {ph}",
                (before_ms, limit),
            ).fetchall()
            if not rows:
                return 0
            sums: dict[tuple[str, str, str, int], list[int]] = {}
            for _id, status, scopes, closed_ms, price, cost, clamped in rows:
                start = closed_ms - closed_ms % DAY_MS
                # A lifetime budget that started within the day counts the holds closed from
                # its start on: they must not share a sum with those before.
                i = bisect.bisect_right(cuts, closed_ms)
                if i and cuts[i - 1] > start:
                    start = cuts[i - 1]
                key = (_day(start), status, scopes, start)
                acc = sums.setdefault(key, [0, 0, 0, 0])
                acc[0] += 1
                acc[1] += price or 0
                acc[2] += cost or 0
                acc[3] += clamped or 0
            cols = ", ".join(HOLDS_COMPACTED.column_names)
            marks = ", ".join([ph] * len(HOLDS_COMPACTED.column_names))
            adds = ", ".join(f"{c} = ledger_holds_compacted.{c} + excluded.{c}" for c in _SUMS)
            upsert = (
                f"INSERT INTO ledger_holds_compacted ({cols}) VALUES ({marks})"
                f" ON CONFLICT (closed_ms, status, scopes) DO UPDATE SET {adds}"
            )
            values = [(*key, *acc) for key, acc in sums.items()]
            ids = [r[0] for r in rows]
            if isinstance(self._conn, sqlite3.Connection):
                self._conn.executemany(upsert, values)
                self._conn.executemany("DELETE FROM ledger_holds WHERE id = ?", [(i,) for i in ids])
            else:
                with self._conn.cursor() as cur:
                    cur.executemany(upsert, values)
                self._conn.execute("DELETE FROM ledger_holds WHERE id = ANY(%s)", (ids,))
            return len(rows)


def _day(start_ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(start_ms // 1000, dt.UTC).strftime("%Y-%m-%d")


__all__ = ["MIN_HOLDS_DAYS", "HoldCompactor"]
