"""Roll up closed days of usage, then delete the raw rows past their retention.

Runs on a connection of its own, off the event loop and off the usage writer (the
retention job's thread, `tokenworks/retention.py`), in bounded steps: at most `max_days`
days rolled up and `max_batches` deletions of `batch_rows` rows per call, each its own
short transaction, so the writers wait at most one small batch.

Two watermarks in `usage_rollup` say how far it got:

- `usage`: every day before it is rolled up (`rollup.py`); summaries read those days from
  `usage_daily`.
- `final`: every day before it was checked against its raw rows one last time (re-rolled if
  a late row had changed it) and may lose its raw rows. A day is never re-rolled after
  that, so a half-deleted day is never rolled up from what is left of it.

On a partitioned PostgreSQL table (`partitions.py`) a month's rows go by dropping its
partition once the whole month is past retention; rows are deleted one by one only from
the default partition, or from a table that is not partitioned.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

from tokenworks.db import backend, job_transaction, sqlite_path
from tokenworks.metering import partitions, rollup
from tokenworks.metering.rollup import DAY_MS, day_of, day_start_ms

BATCH_ROWS = 5_000


class UsageRetention:
    """Roll-ups and raw-row retention of one database's usage table."""

    def __init__(self, url: str) -> None:
        self.dialect = "sqlite" if backend(url) == "sqlite" else "postgres"
        self.ph = "?" if self.dialect == "sqlite" else "%s"
        self._pg: Any = None
        self._lite: sqlite3.Connection | None = None
        if self.dialect == "sqlite":
            from tokenworks.db.sqlite import connect_rows
            from tokenworks.metering.store import USAGE

            self._lite = connect_rows(sqlite_path(url), USAGE.ddl("sqlite") + rollup.ddl("sqlite"))
        else:
            from tokenworks.db.postgres import connect
            from tokenworks.metering.store_postgres import ddl

            self._pg = connect(url, ddl())

    def close(self) -> None:
        if self._lite is not None:
            self._lite.close()
        if self._pg is not None:
            self._pg.close()

    # ------------------------------------------------------------------ SQL plumbing

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return job_transaction(self._lite if self._lite is not None else self._pg)

    def _exec(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> int:
        conn: Any = self._lite if self._lite is not None else self._pg
        cur = conn.execute(sql, params)
        return int(cur.rowcount)

    def _value(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> Any:
        conn: Any = self._lite if self._lite is not None else self._pg
        row = conn.execute(sql, params).fetchone()
        if row is None:
            return None
        return next(iter(row.values())) if isinstance(row, dict) else row[0]

    def watermark(self, name: str = "usage") -> int | None:
        value = self._value(f"SELECT until_ms FROM usage_rollup WHERE name = {self.ph}", [name])
        return None if value is None else int(value)

    def _set_watermark(self, name: str, until_ms: int) -> None:
        self._exec(
            "INSERT INTO usage_rollup (name, until_ms) VALUES "
            f"({self.ph}, {self.ph}) ON CONFLICT (name) DO UPDATE SET until_ms = excluded.until_ms",
            [name, until_ms],
        )

    def _roll_day(self, start_ms: int, watermark: str | None = None) -> None:
        """Replace one day's roll-up from its raw rows, and move a watermark past it. The
        rows are read first, outside the transaction, which then only writes the roll-up's
        few rows: a writer waits for that, never for a day's GROUP BY."""
        day = day_of(start_ms)
        conn: Any = self._lite if self._lite is not None else self._pg
        rows = [
            tuple(r.values()) if isinstance(r, dict) else tuple(r)
            for r in conn.execute(rollup.day_rows_sql(self.ph), [day, start_ms, start_ms + DAY_MS])
        ]
        delete, insert = rollup.replace_day_sql(self.ph)
        with self._tx():
            self._exec(delete, [day])
            if rows:
                if self._lite is not None:
                    self._lite.executemany(insert, rows)
                else:
                    with self._pg.cursor() as cur:
                        cur.executemany(insert, rows)
            if watermark is not None:
                self._set_watermark(watermark, start_ms + DAY_MS)

    def _next_row_ms(self, from_ms: int | None) -> int | None:
        where = "" if from_ms is None else f" WHERE ts_ms >= {self.ph}"
        value = self._value(
            f"SELECT MIN(ts_ms) FROM usage{where}", [] if from_ms is None else [from_ms]
        )
        return None if value is None else int(value)

    # ------------------------------------------------------------------ roll-ups

    def roll_up(self, now_ms: int, max_days: int = 31) -> int:
        """Roll up the closed days after the watermark, at most `max_days` of them (days
        without rows are skipped in one step); returns the days rolled up."""
        closed_ms = rollup.closed_until_ms(now_ms)
        mark = self.watermark()
        rolled = 0
        while rolled < max_days:
            nxt = self._next_row_ms(mark)
            # Nothing until the next row's day: move the watermark over the empty days.
            start = closed_ms if nxt is None else min(day_start_ms(nxt), closed_ms)
            if mark is not None:
                start = max(start, mark)
            if start >= closed_ms:
                if mark is None or closed_ms > mark:
                    with self._tx():
                        self._set_watermark("usage", closed_ms)
                break
            self._roll_day(start, "usage")
            mark = start + DAY_MS
            rolled += 1
        return rolled

    # ------------------------------------------------------------------ retention

    def expire(self, cutoff_ms: int, batch_rows: int = BATCH_ROWS, max_batches: int = 100) -> int:
        """Delete the raw rows of the days before `cutoff_ms` (whole UTC days, rolled up
        first), at most `max_batches` transactions of `batch_rows` rows (or dropped
        partitions); returns how many rows (and partitions) went."""
        rolled = self.watermark()
        if rolled is None:
            return 0
        cutoff_ms = min(day_start_ms(cutoff_ms), rolled)
        partitioned = self._pg is not None and partitions.is_partitioned(self._pg)
        gone = 0
        batches = 0
        if partitioned:
            for name in partitions.months(self._pg):
                start = partitions.start_of(name)
                end = partitions.next_month_ms(start)
                if end > cutoff_ms or batches >= max_batches:
                    break
                self._finalise(end)
                partitions.drop(self._pg, name)
                gone += 1
                batches += 1
        table = partitions.DEFAULT if partitioned else "usage"
        while batches < max_batches:
            first = self._next_row_ms(None) if not partitioned else self._first_in(table)
            if first is None or first >= cutoff_ms:
                break
            day_end = day_start_ms(first) + DAY_MS
            self._finalise(day_end)
            while batches < max_batches:
                n = self._delete_batch(table, day_end, batch_rows)
                gone += n
                batches += 1
                if n < batch_rows:
                    break
        return gone

    def _first_in(self, table: str) -> int | None:
        value = self._value(f"SELECT MIN(ts_ms) FROM {table}")
        return None if value is None else int(value)

    def _finalise(self, until_ms: int) -> None:
        """Check each day before `until_ms` not yet final against its raw rows, re-roll one
        that a late row changed, and mark them final: their raw rows may go."""
        final = self.watermark("final")
        day = self._next_row_ms(final) if final is None else final
        if day is None:
            return
        day = day_start_ms(day)
        count_raw, count_daily = rollup.day_counts_sql(self.ph)
        while day < until_ms:
            # Counted outside a transaction (reads); a day a late row changed is rolled up
            # again, and marked final with its new roll-up.
            raw = int(self._value(count_raw, [day, day + DAY_MS]))
            if raw != int(self._value(count_daily, [day_of(day)])):
                self._roll_day(day, "final")
            else:
                with self._tx():
                    self._set_watermark("final", day + DAY_MS)
            day += DAY_MS

    def _delete_batch(self, table: str, before_ms: int, batch_rows: int) -> int:
        ph = self.ph
        # Rows of days that are final only; one bounded transaction.
        key = "rowid" if self.dialect == "sqlite" else "request_id, ts_ms"
        with self._tx():
            return self._exec(
                f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}"
                f" WHERE ts_ms < {ph} LIMIT {ph})",
                [before_ms, batch_rows],
            )


__all__ = ["BATCH_ROWS", "UsageRetention"]
