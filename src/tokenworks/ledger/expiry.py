"""Delete ledger transfers before the retention horizon, keeping what `check()` needs.

The horizon (`ledger_meta` `transfers_horizon_ms`, a week boundary: `schema.PERIOD_MS`)
only moves forward: every transfer from it on is kept, transfers before it may be gone.
It is the last week boundary before `now - retention.transfers_days`, and never past the
week of the oldest hold row still kept (so a hold with a row keeps its spend transfers and
its own check: compaction that lags holds the horizon back) nor later than `MIN_HOLDS_DAYS`
before now.

What stays in place of a deleted transfer is written in the transaction that deletes it,
so a crash leaves either the rows or their sums, never neither, never both:

- its accounts' `ledger_account_periods.dropped_nano` of its week (the period net itself,
  fed on insert, is untouched), so for every week net = dropped + the stored transfers';
- its buckets' `ledger_bucket_bases.net_nano`;
- its week's and kind's `ledger_transfers_dropped` amount and count.

Before the transfers of a week first go, the week is proved against its period rows (each
account's net = dropped + its stored transfers of the week); a week that disagrees is
logged and nothing from it on is deleted. The proof is not repeated: every later commit
(the ledger's inserts, these deletions) keeps the equality by construction, and `check()`
proves it again for every week.

SQLite, an unpartitioned PostgreSQL table, and PostgreSQL's default partition: batches of
`batch_rows` rows, oldest id first, stopping at the first row from the horizon on (ids grow
with time; a back-dated grant transfer goes once the walk reaches it). PostgreSQL's monthly
partitions: a month whose end the horizon has passed is summed (one scan of it) and
DETACHed and DROPped in one transaction, under a short lock timeout (the DETACH waits for
audits and statements reading the table, and writers queue behind it: a month that cannot
be had within the timeout is tried on the next run).

Runs on a connection of its own (sqlite3 or psycopg), on the retention job's thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from tokenworks.db import backend, job_transaction, sqlite_path
from tokenworks.ledger.compaction import DAY_MS, MIN_HOLDS_DAYS
from tokenworks.ledger.schema import HORIZON_KEY, PERIOD_MS, TRANSFERS_DEFAULT, VERIFIED_KEY
from tokenworks.ledger.store import exact
from tokenworks.metering import partitions

log = logging.getLogger(__name__)

TABLE = "ledger_transfers"
BATCH_ROWS = 5_000
LOCK_TIMEOUT_MS = 1_000  # what the ledger's writer may queue behind a month's DETACH
VERIFY_CHUNK_WEEKS = 4  # weeks proved per query: a month's period rows at most in memory
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_COLUMNS = (
    "id, ts_ms, kind, debit_account_id, credit_account_id, amount_nano,"
    " debit_bucket_id, credit_bucket_id"
)
# The proof of the weeks in a range: each account's period net against its dropped part
# and its stored transfers of the week (by the account indexes: no scan of the transfers by
# time). One pass over the range's period rows.
VERIFY_WEEKS = f"""
SELECT p.period_start_ms, p.account_id, p.net_nano, p.dropped_nano,
  (SELECT XSUM(amount_nano) FROM ledger_transfers t WHERE t.credit_account_id = p.account_id
   AND t.ts_ms >= p.period_start_ms AND t.ts_ms < p.period_start_ms + {PERIOD_MS}),
  (SELECT XSUM(amount_nano) FROM ledger_transfers t WHERE t.debit_account_id = p.account_id
   AND t.ts_ms >= p.period_start_ms AND t.ts_ms < p.period_start_ms + {PERIOD_MS})
FROM ledger_account_periods p WHERE p.period_start_ms >= {{ph}} AND p.period_start_ms < {{ph}}
"""


def week_floor(ms: int) -> int:
    return ms - ms % PERIOD_MS


class Sums:
    """What a set of deleted transfers leaves behind."""

    def __init__(self) -> None:
        self.periods: dict[tuple[int, int], int] = {}  # (account, week) -> net
        self.bases: dict[int, int] = {}  # bucket -> net
        self.dropped: dict[tuple[int, str], list[int]] = {}  # (week, kind) -> [amount, count]
        self.rows = 0

    def add(self, row: Sequence[Any]) -> None:
        _id, ts, kind, debit, credit, amount, debit_bucket, credit_bucket = row
        week = week_floor(ts)
        for acc, signed in ((credit, amount), (debit, -amount)):
            self.periods[(acc, week)] = self.periods.get((acc, week), 0) + signed
        if credit_bucket is not None:
            self.bases[credit_bucket] = self.bases.get(credit_bucket, 0) + amount
        if debit_bucket is not None:
            self.bases[debit_bucket] = self.bases.get(debit_bucket, 0) - amount
        acc_kind = self.dropped.setdefault((week, kind), [0, 0])
        acc_kind[0] += amount
        acc_kind[1] += 1
        self.rows += 1


class Refusal(Exception):
    """The store disagrees with what is about to be deleted: nothing is."""


class TransferExpiry:
    """Moves the horizon and deletes the transfers before it, in bounded transactions."""

    def __init__(self, url: str) -> None:
        self.dialect = "sqlite" if backend(url) == "sqlite" else "postgres"
        self.ph = "?" if self.dialect == "sqlite" else "%s"
        self._conn: Any
        if self.dialect == "sqlite":
            from tokenworks.db import sqlite as db_sqlite
            from tokenworks.ledger.store_sqlite import connect

            conn = connect(sqlite_path(url))
            db_sqlite.use_wal(conn, synchronous="FULL", busy_timeout_ms=30_000)
            self._conn = conn
        else:
            from psycopg.rows import tuple_row

            from tokenworks.db.postgres import connect as pg_connect

            self._conn = pg_connect(url)
            self._conn.row_factory = tuple_row

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ SQL plumbing

    def _tx(self) -> contextlib.AbstractContextManager[None]:
        return job_transaction(self._conn)

    def _sql(self, text: str) -> str:
        return text.replace("XSUM(", "xsum(" if self.dialect == "sqlite" else "SUM(")

    def _rows(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # No parameters: None, so that psycopg reads a `%` as the operator it is.
        args = params if params or self.dialect == "sqlite" else None
        cur = self._conn.execute(self._sql(text), args)
        return [tuple(r) for r in cur.fetchall()]

    def _value(self, text: str, params: Sequence[Any] = ()) -> Any:
        rows = self._rows(text, params)
        return rows[0][0] if rows else None

    def _wide(self, v: int) -> Any:
        """A WIDE value as a parameter: SQLite takes one past int64 as BLOB digits."""
        if self.dialect == "sqlite" and not INT64_MIN <= v <= INT64_MAX:
            return str(v).encode()
        return v

    def _add(self, column: str, excluded: str) -> str:
        """`column + excluded`, exact past int64 on SQLite too (`xadd`)."""
        if self.dialect == "sqlite":
            return f"xadd({column}, {excluded})"
        return f"{column} + {excluded}"

    def has_ledger(self) -> bool:
        if self.dialect == "sqlite":
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_meta'"
        else:
            sql = "SELECT 1 WHERE to_regclass('ledger_meta') IS NOT NULL"
        return bool(self._rows(sql))

    def partitioned(self) -> bool:
        return self.dialect == "postgres" and partitions.is_partitioned(self._conn, TABLE)

    def _meta(self, key: str) -> int | None:
        v = self._value(f"SELECT v FROM ledger_meta WHERE k = {self.ph}", (key,))
        return None if v is None else int(v)

    def _set_meta(self, key: str, value: int) -> None:
        self._conn.execute(
            f"INSERT INTO ledger_meta (k, v) VALUES ({self.ph}, {self.ph})"
            " ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            (key, value),
        )

    # ------------------------------------------------------------------ partitions

    def ensure_partitions(self, now_ms: int) -> None:
        """This month's and the next month's partitions of a partitioned PostgreSQL table
        (made at the ledger's open too); a row of a month without one waits in the
        default partition, never refused, and moves when its month is made."""
        import psycopg

        if not (self.has_ledger() and self.partitioned()):
            return
        try:
            partitions.ensure(
                self._conn, partitions.next_month_ms(now_ms), now_ms, TABLE, LOCK_TIMEOUT_MS
            )
        except psycopg.errors.LockNotAvailable:
            log.info("retention: %s is in use; its next partition is made on a later run", TABLE)

    # ------------------------------------------------------------------ the horizon

    def horizon_ms(self) -> int:
        return self._meta(HORIZON_KEY) or 0

    def advance(self, cutoff_ms: int, now_ms: int) -> int:
        """Move the horizon towards `cutoff_ms` (see the module docstring); returns it."""
        want = week_floor(min(cutoff_ms, now_ms - MIN_HOLDS_DAYS * DAY_MS))
        oldest_hold = self._value("SELECT MIN(closed_ms) FROM ledger_holds")
        if oldest_hold is not None:
            want = min(want, week_floor(int(oldest_hold)))
        current = self.horizon_ms()
        if want > current:
            with self._tx():
                self._set_meta(HORIZON_KEY, want)
            return want
        return current

    def verify(self, until_ms: int, max_chunks: int = 26) -> int:
        """Prove the weeks before `until_ms` not proved yet, `VERIFY_CHUNK_WEEKS` weeks per
        query and at most `max_chunks` queries a call (the first run over years of history
        takes a few); returns the end of the proved weeks: the first week that disagrees
        stops it there, logged, on this call and every later one until it agrees."""
        done = self._meta(VERIFIED_KEY) or 0
        proved = done
        for _ in range(max_chunks):
            if proved >= until_ms:
                break
            first = self._value(
                "SELECT MIN(period_start_ms) FROM ledger_account_periods"
                f" WHERE period_start_ms >= {self.ph} AND period_start_ms < {self.ph}",
                (proved, until_ms),
            )
            if first is None:  # no period row left before until_ms
                proved = until_ms
                break
            end = min(until_ms, int(first) + VERIFY_CHUNK_WEEKS * PERIOD_MS)
            bad = self._first_disagreement(int(first), end)
            if bad is not None:
                proved = bad
                break
            proved = end
        if proved > done:
            with self._tx():
                self._set_meta(VERIFIED_KEY, proved)
        return proved

    def _first_disagreement(self, since_ms: int, until_ms: int) -> int | None:
        """The first week in [since, until) whose period rows disagree with its transfers."""
        bad: tuple[Any, ...] | None = None
        disagree = 0
        cur = self._conn.execute(self._sql(VERIFY_WEEKS.format(ph=self.ph)), (since_ms, until_ms))
        for row in cur:
            week, _acc, net, dropped, credits, debits = row
            if exact(net) != exact(dropped) + exact(credits) - exact(debits):
                disagree += 1
                if bad is None or week < bad[0]:
                    bad = tuple(row)
        if bad is None:
            return None
        week, acc, net, dropped, credits, debits = bad
        log.error(
            "retention: not deleting ledger transfers from the week of %d ms on: account"
            " %s's period net %s != dropped %s + transfers %s (%d period rows disagree)",
            week, acc, exact(net), exact(dropped), exact(credits) - exact(debits), disagree,
        )  # fmt: skip
        return int(week)

    # ------------------------------------------------------------------ deleting

    def expire(
        self, cutoff_ms: int, now_ms: int, batch_rows: int = BATCH_ROWS, max_batches: int = 100
    ) -> int:
        """Move the horizon towards `cutoff_ms` and delete the transfers before it, at most
        `max_batches` transactions (a month partition is one); returns how many went."""
        if not self.has_ledger():
            return 0
        limit = min(self.advance(cutoff_ms, now_ms), self.verify(self.horizon_ms()))
        gone = 0
        try:
            gone = self._expire(limit, batch_rows, max_batches)
        except Refusal as exc:  # rolled back: the rows are still there, and no sums
            log.error("retention: not deleting ledger transfers: %s", exc)
        return gone

    def _expire(self, limit: int, batch_rows: int, max_batches: int) -> int:
        gone = batches = 0
        table = TABLE
        if self.partitioned():
            table = TRANSFERS_DEFAULT
            for name in partitions.months(self._conn, TABLE):
                start = partitions.start_of(name)
                if partitions.next_month_ms(start) > limit or batches >= max_batches:
                    break
                n = self._drop_month(name)
                if n is None:
                    return gone
                gone += n
                batches += 1
        while batches < max_batches:
            n = self._batch(table, limit, batch_rows)
            gone += n
            batches += 1
            if n < batch_rows:
                break
        return gone

    def _apply(self, sums: Sums) -> None:
        """Add what the deleted rows leave behind; in the deleting transaction."""
        ph, conn = self.ph, self._conn
        for (acc, week), net in sums.periods.items():
            if not net:
                continue
            n = conn.execute(
                "UPDATE ledger_account_periods SET dropped_nano ="
                f" {self._add('dropped_nano', ph)}"
                f" WHERE account_id = {ph} AND period_start_ms = {ph}",
                (self._wide(net), acc, week),
            ).rowcount
            if n != 1:
                raise Refusal(f"account {acc} has no period row for week {week}")
        bases = [(b, self._wide(v)) for b, v in sums.bases.items() if v]
        dropped = [(w, k, self._wide(a), c) for (w, k), (a, c) in sums.dropped.items()]
        cur = conn.cursor()
        try:
            cur.executemany(
                f"INSERT INTO ledger_bucket_bases (bucket_id, net_nano) VALUES ({ph}, {ph})"
                " ON CONFLICT (bucket_id) DO UPDATE SET net_nano ="
                f" {self._add('ledger_bucket_bases.net_nano', 'excluded.net_nano')}",
                bases,
            )
            cur.executemany(
                "INSERT INTO ledger_transfers_dropped (period_start_ms, kind, amount_nano,"
                f" transfers) VALUES ({ph}, {ph}, {ph}, {ph}) ON CONFLICT (period_start_ms, kind)"
                " DO UPDATE SET amount_nano ="
                f" {self._add('ledger_transfers_dropped.amount_nano', 'excluded.amount_nano')},"
                " transfers = ledger_transfers_dropped.transfers + excluded.transfers",
                dropped,
            )
        finally:
            cur.close()

    def _batch(self, table: str, before_ms: int, limit: int) -> int:
        """Delete up to `limit` transfers, oldest id first, up to the first one from
        `before_ms` on; returns how many went."""
        ph = self.ph
        with self._tx():
            rows = self._rows(f"SELECT {_COLUMNS} FROM {table} ORDER BY id LIMIT {ph}", (limit,))
            sums = Sums()
            for r in rows:
                if r[1] >= before_ms:
                    break
                sums.add(r)
            if not sums.rows:
                return 0
            ids = [r[0] for r in rows[: sums.rows]]
            self._apply(sums)
            if self.dialect == "sqlite":
                n = self._conn.executemany(
                    f"DELETE FROM {table} WHERE id = ?", [(i,) for i in ids]
                ).rowcount
            else:
                n = self._conn.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (ids,)).rowcount
            if n != len(ids):
                raise Refusal(f"deleted {n} transfers, not {len(ids)}")
            return int(n)

    def _drop_month(self, name: str) -> int | None:
        """Sum one month partition, then DETACH and DROP it, in one transaction; None when
        its locks could not be had in time (the next run tries again)."""
        import psycopg

        assert name.startswith(f"{TABLE}_p") and name[-6:].isdigit(), name
        try:
            with self._tx():
                self._conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                # A late (back-dated) row of this month waits until the month is gone, then
                # lands in the default partition: never deleted without its sums.
                self._conn.execute(f"LOCK TABLE {name} IN SHARE MODE")
                groups, updated = self._rows(MONTH_PERIODS.format(t=name))[0]
                if groups != updated:
                    raise Refusal(f"{name}: {groups - updated} (account, week) without a period")
                self._conn.execute(MONTH_BASES.format(t=name), None)
                (n,) = self._rows(MONTH_DROPPED.format(t=name))[0]
                self._conn.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {name}")
                self._conn.execute(f"DROP TABLE {name}")
        except psycopg.errors.LockNotAvailable:
            log.info("retention: %s is in use; dropped on a later run", name)
            return None
        return int(n or 0)


# A month partition's sums, on the server (one scan each; a month may hold many millions).
MONTH_PERIODS = f"""
WITH s AS (
  SELECT a, w, SUM(n) AS n FROM (
    SELECT credit_account_id AS a, ts_ms - ts_ms % {PERIOD_MS} AS w, amount_nano::numeric AS n
    FROM {{t}}
    UNION ALL
    SELECT debit_account_id, ts_ms - ts_ms % {PERIOD_MS}, -amount_nano::numeric FROM {{t}}
  ) m GROUP BY a, w
), u AS (
  UPDATE ledger_account_periods p SET dropped_nano = p.dropped_nano + s.n FROM s
  WHERE p.account_id = s.a AND p.period_start_ms = s.w RETURNING 1
)
SELECT (SELECT COUNT(*) FROM s), (SELECT COUNT(*) FROM u)
"""
MONTH_BASES = """
INSERT INTO ledger_bucket_bases (bucket_id, net_nano)
SELECT b, SUM(n) FROM (
  SELECT credit_bucket_id AS b, amount_nano::numeric AS n FROM {t}
  WHERE credit_bucket_id IS NOT NULL
  UNION ALL
  SELECT debit_bucket_id, -amount_nano::numeric FROM {t} WHERE debit_bucket_id IS NOT NULL
) m GROUP BY b
ON CONFLICT (bucket_id) DO UPDATE SET net_nano = ledger_bucket_bases.net_nano + EXCLUDED.net_nano
"""
MONTH_DROPPED = f"""
WITH i AS (
  INSERT INTO ledger_transfers_dropped (period_start_ms, kind, amount_nano, transfers)
  SELECT ts_ms - ts_ms % {PERIOD_MS}, kind, SUM(amount_nano), COUNT(*) FROM {{t}}
  GROUP BY 1, 2
  ON CONFLICT (period_start_ms, kind) DO UPDATE SET
    amount_nano = ledger_transfers_dropped.amount_nano + EXCLUDED.amount_nano,
    transfers = ledger_transfers_dropped.transfers + EXCLUDED.transfers
  RETURNING 1
)
SELECT (SELECT COUNT(*) FROM {{t}})
"""


def ensure_partitions(url: str, now_ms: int) -> None:
    """`TransferExpiry.ensure_partitions` on a connection of its own (the ledger's open)."""
    job = TransferExpiry(url)
    try:
        job.ensure_partitions(now_ms)
    finally:
        job.close()


__all__ = ["BATCH_ROWS", "Refusal", "TransferExpiry", "ensure_partitions", "week_floor"]
