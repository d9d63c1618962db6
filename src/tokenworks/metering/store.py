"""The usage table: one row per request, written by group commit, queried by group.

Writes leave the hot path at once: a request appends its record to a bounded queue and a
single writer thread commits whatever has accumulated in one transaction (up to
`MAX_BATCH_ROWS`). A row the database refuses (a value past its column: the rows the ledger
would not attach come here) is dropped alone: the batch is halved until it is isolated, as the
ledger's writer does, so it never takes other requests' rows down with it.

Two backends share this module's columns, row mapping, query building and writer loop, and
differ only in how a batch is written, what counts as a refusal and how a query is run:

- SQLite (`sqlite:///path`, the default, here): WAL mode with `synchronous=NORMAL` gives one
  fsync per batch at checkpoint time, so thousands of requests per second cost a handful of
  commits.
- PostgreSQL (`postgresql://...[?schema=NAME]`, `store_postgres.py`): one
  `INSERT ... SELECT FROM unnest(arrays)` statement per batch.

`open_usage_store(url)` (or `UsageStore(url)`) picks the backend from the URL.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenworks.db import backend, sqlite_path
from tokenworks.db.reads import READ_TIMEOUT_S, ReadPool, sqlite_deadline
from tokenworks.db.sqlite import REFUSALS as SQLITE_REFUSALS
from tokenworks.db.sqlite import connect_rows
from tokenworks.db.table import Table
from tokenworks.metering import rollup
from tokenworks.metering.usage import Usage, UsageRecord

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 2048
MAX_QUEUE_ROWS = 100_000
FLUSH_INTERVAL_S = 0.02
RECORDS_PAGE_ROWS = 10_000  # rows per page of `iter_records`
READERS = 3  # read connections per usage store: admin reads that may run side by side
REFUSAL_LOG_INTERVAL_S = 10.0

# (column, SQL type); the order is the row order of `usage_row`.
USAGE_SCHEMA = (
    ("request_id", "TEXT"),
    ("ts_ms", "BIGINT"),
    ("key_id", "TEXT"),
    ("account_id", "TEXT"),
    ("public_model", "TEXT"),
    ("producer", "TEXT"),
    ("upstream_model", "TEXT"),
    ("endpoint", "TEXT"),
    ("status", "INTEGER"),
    ("input_tokens", "BIGINT"),
    ("cached_input_tokens", "BIGINT"),
    ("cache_write_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("reasoning_tokens", "BIGINT"),
    ("estimated", "INTEGER"),
    ("latency_ms", "DOUBLE PRECISION"),
    ("ttft_ms", "DOUBLE PRECISION"),
    ("streamed", "INTEGER"),
    ("error", "TEXT"),
    ("cost_nano", "BIGINT"),
    ("price_nano", "BIGINT"),
    ("service_tier", "TEXT"),
    ("tags", "TEXT"),
    ("clamped_nano", "BIGINT"),
    ("queue_ms", "DOUBLE PRECISION"),
)
# Columns added after the table first shipped: (column, SQL type, default for rows an earlier
# version wrote). Each store adds the missing ones as it opens (`upgrade_sql`).
USAGE_COLUMNS = tuple(name for name, _ in USAGE_SCHEMA)

_NULLABLE = (
    "request_id",  # the key: never NULL in practice, declared as it always was
    "key_id",
    "account_id",
    "producer",
    "upstream_model",
    "ttft_ms",
    "error",
    "service_tier",
    "queue_ms",  # added later: NULL in the rows of databases that predate it
)
# Columns added after the table was first released: `ALTER TABLE ... ADD COLUMN` on open,
# for databases an earlier version created (CREATE TABLE IF NOT EXISTS leaves them as they are).
# Columns later versions added, with the default the rows already there get (None: NULL,
# unknown); a table an earlier version made gains them on open (`upgrade_sql`).
ADDED_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("clamped_nano", "BIGINT", "0"),
    ("queue_ms", "DOUBLE PRECISION", None),
)
USAGE = Table(
    "usage",
    ("request_id",),
    USAGE_SCHEMA,
    upsert=False,  # a request's row is written once; a retried write is ignored
    constraints=tuple((name, "NOT NULL") for name in USAGE_COLUMNS if name not in _NULLABLE),
    indexes=(
        "CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts_ms)",
        "CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts_ms)",
    ),
)

GROUPS = {
    "key": "key_id",
    "model": "public_model",
    "producer": "producer",
    "account": "account_id",
    "upstream_model": "upstream_model",
    "status": "status",
    # UTC calendar day of the request, YYYY-MM-DD; dialect-specific, see DAY_EXPR.
    "day": "",
}

# `ts_ms / 1000` is integer division in both dialects, so both truncate the same way.
DAY_EXPR = {
    "sqlite": "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
    "postgres": "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}

SUMS = rollup.SUMS  # the summed columns, the same in the raw rows and the daily roll-up


def usage_row(record: UsageRecord) -> tuple[Any, ...]:
    """The record as a row. Text that came from outside (an upstream's error message, a
    client's model or tier) may hold NUL, which PostgreSQL cannot store and which would fail
    the whole group commit the row rides in: it becomes U+FFFD."""
    row = _row(record)
    # The fields outside text can reach (the rest are the gateway's own ids and config names;
    # tags are JSON, where NUL is written as an escape).
    outside = (record.error or "") + (record.service_tier or "") + record.public_model
    if "\x00" in outside:
        return tuple(v.replace("\x00", "\ufffd") if type(v) is str else v for v in row)
    return row


def _row(record: UsageRecord) -> tuple[Any, ...]:
    u = record.usage
    return (
        record.request_id,
        record.ts_ms,
        record.key_id,
        record.account_id,
        record.public_model,
        record.producer,
        record.upstream_model,
        record.endpoint,
        record.status,
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        int(u.estimated),
        record.latency_ms,
        record.ttft_ms,
        int(record.streamed),
        record.error,
        record.cost_nano,
        record.price_nano,
        record.service_tier,
        json.dumps(record.tags, separators=(",", ":"), sort_keys=True),
        record.clamped_nano,
        record.queue_ms,
    )


def record_from_row(row: sqlite3.Row | Mapping[str, Any]) -> UsageRecord:
    r = dict(row)
    return UsageRecord(
        request_id=r["request_id"],
        ts_ms=r["ts_ms"],
        key_id=r["key_id"],
        account_id=r["account_id"],
        public_model=r["public_model"],
        producer=r["producer"],
        upstream_model=r["upstream_model"],
        endpoint=r["endpoint"],
        status=r["status"],
        usage=Usage(
            input_tokens=r["input_tokens"],
            cached_input_tokens=r["cached_input_tokens"],
            cache_write_tokens=r["cache_write_tokens"],
            output_tokens=r["output_tokens"],
            reasoning_tokens=r["reasoning_tokens"],
            estimated=bool(r["estimated"]),
        ),
        latency_ms=r["latency_ms"],
        ttft_ms=r["ttft_ms"],
        streamed=bool(r["streamed"]),
        error=r["error"],
        cost_nano=r["cost_nano"],
        price_nano=r["price_nano"],
        service_tier=r["service_tier"],
        tags=json.loads(r["tags"] or "{}"),
        clamped_nano=r["clamped_nano"],
        queue_ms=r.get("queue_ms"),
    )


def upgrade_sql(dialect: str, present: Iterable[str] = ()) -> list[str]:
    """The statements that add `ADDED_COLUMNS` to a usage table an earlier version made:
    PostgreSQL's `IF NOT EXISTS` decides itself; SQLite has none, so it is told the
    columns `present`."""

    def column(name: str, ty: str, default: str | None) -> str:
        return f"{name} {ty}" + ("" if default is None else f" NOT NULL DEFAULT {default}")

    if dialect == "postgres":
        return [f"ALTER TABLE usage ADD COLUMN IF NOT EXISTS {column(*c)}" for c in ADDED_COLUMNS]
    have = set(present)
    return [f"ALTER TABLE usage ADD COLUMN {column(*c)}" for c in ADDED_COLUMNS if c[0] not in have]


def group_expr(group: str, dialect: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"unknown group_by {group!r}; one of: {', '.join(GROUPS)}")
    return DAY_EXPR[dialect] if group == "day" else GROUPS[group]


def _where(
    ph: str, since_ms: int | None, until_ms: int | None, key_id: str | None = None
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if since_ms is not None:
        where.append(f"ts_ms >= {ph}")
        params.append(since_ms)
    if until_ms is not None:
        where.append(f"ts_ms < {ph}")
        params.append(until_ms)
    if key_id is not None:
        where.append(f"key_id = {ph}")
        params.append(key_id)
    return (" WHERE " + " AND ".join(where) if where else ""), params


def query_sql(
    dialect: str,
    groups: list[str],
    since_ms: int | None = None,
    until_ms: int | None = None,
    key_id: str | None = None,
    page: rollup.PageRange | None = None,
) -> tuple[str, list[Any]]:
    """The summary query for a dialect (`?` placeholders for SQLite, `%s` for PostgreSQL);
    `page` keeps one page of it."""
    select = [f"{group_expr(g, dialect)} AS {g}" for g in groups]
    select += ["COUNT(*) AS requests"] + [f"COALESCE(SUM({s}),0) AS {s}" for s in SUMS]
    ph = PLACEHOLDER[dialect]
    where, params = _where(ph, since_ms, until_ms, key_id)
    if page is not None:
        cond, cond_params = rollup.page_condition(dialect, page, ph)
        where += (" AND " if where else " WHERE ") + cond
        params += cond_params
    sql = f"SELECT {', '.join(select)} FROM usage{where}"
    if groups:
        sql += (
            " GROUP BY "
            + ", ".join(groups)
            + " ORDER BY "
            + ", ".join(_order(g, dialect) for g in groups)
        )
    return sql, params


def _order(group: str, dialect: str) -> str:
    # Both dialects order the same way: NULL first (SQLite's default) and text by code point
    # (PostgreSQL would otherwise use the database's locale).
    return f"{group_expr(group, dialect)}{rollup.collation(dialect, group)} NULLS FIRST"


def records_sql(
    dialect: str,
    since_ms: int | None,
    until_ms: int | None,
    limit: int,
    after: tuple[int, str] | None = None,
) -> tuple[str, list[Any]]:
    """Records in (ts_ms, request_id) order, after the row `after` (keyset paging: each page
    starts where the last ended, by the ts_ms index, whatever the page's depth)."""
    ph = PLACEHOLDER[dialect]
    where, params = _where(ph, since_ms, until_ms)
    if after is not None:
        where += " AND " if where else " WHERE "
        where += f"(ts_ms > {ph} OR (ts_ms = {ph} AND request_id > {ph}))"
        params += [after[0], after[0], after[1]]
    # request_id breaks ties so both dialects return equal-time rows in the same order.
    return f"SELECT * FROM usage{where} ORDER BY ts_ms, request_id LIMIT {ph}", [*params, limit]


PLACEHOLDER = {"sqlite": "?", "postgres": "%s"}


def day_ms(day: str) -> int:
    """The start of a `YYYY-MM-DD` UTC day, in ms (ValueError when it is not one)."""
    parsed = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return int(parsed.timestamp()) * 1000


@dataclass(slots=True)
class Summary:
    group: dict[str, Any]
    requests: int
    sums: dict[str, int]


@dataclass(slots=True)
class SummaryPage:
    """A page of a summary: every group whose first value lies in the page. `last` is the
    first group's value the page ends with, the `after` of the next page (None: nothing
    followed the page's NULL group)."""

    rows: list[Summary]
    has_more: bool
    last: Any


MAX_PAGE_VALUES = 10_000  # first-group values a page may ask for
# One MIN or MAX a subquery: SQLite reads either end of an index only for a lone MIN or MAX.
DAY_PAGE_EDGES = (
    "SELECT (SELECT MIN(ts_ms) FROM usage) AS lo, (SELECT MAX(ts_ms) FROM usage) AS hi",
    "SELECT (SELECT MIN(day) FROM usage_daily) AS lo, (SELECT MAX(day) FROM usage_daily) AS hi",
)

FETCH_CHUNK_ROWS = 500


def fetch_yielding(cursor: Any) -> list[Any]:
    """A cursor's rows, fetched `FETCH_CHUNK_ROWS` at a time with the GIL let go between
    chunks: `fetchall` of a 200,000-group summary is one C call that holds it throughout,
    and the event loop's paying requests would wait for the whole of it."""
    rows: list[Any] = []
    while chunk := cursor.fetchmany(FETCH_CHUNK_ROWS):
        rows += chunk
        time.sleep(0)  # a waiting thread (the event loop's) takes the GIL here
    return rows


def summaries(groups: list[str], rows: Iterable[Mapping[str, Any]]) -> list[Summary]:
    """The rows as `Summary`s, letting go of the GIL every `FETCH_CHUNK_ROWS`: a paging
    walk converts a page after each short read, and each conversion held in one piece is a
    stall of the event loop's paying requests (bench/scale.py: a walk's p99 rose with the
    page size, from 3.4x at 1,000 keys a page to 4-7.5x at 10,000)."""
    out: list[Summary] = []
    for i, row in enumerate(rows, 1):
        # int(): PostgreSQL's SUM(bigint) is numeric, which arrives as Decimal.
        out.append(
            Summary(
                group={g: row[g] for g in groups},
                requests=int(row["requests"]),
                sums={s: int(row[s]) for s in SUMS},
            )
        )
        if i % FETCH_CHUNK_ROWS == 0:
            time.sleep(0)  # a waiting thread (the event loop's) takes the GIL here
    return out


def open_usage_store(url: str) -> UsageStore:
    """The usage store for a `sqlite://` or `postgresql://` (`postgres://`) URL."""
    return _backend(url)(url)


def _backend(url: str) -> type[UsageStore]:
    if backend(url) == "sqlite":
        return SqliteUsageStore
    from tokenworks.metering.store_postgres import PostgresUsageStore

    return PostgresUsageStore


class UsageStore:
    """The usage table with a group-committing writer thread; one interface, two backends.

    `UsageStore(url)` returns the backend for the URL (like `open_usage_store`). Subclasses
    implement `_write` (one transaction per batch), `_fetch` and `_close_connections`.
    `submit` never blocks; `flush`, `query`, `records` and `close` are synchronous: the
    gateway calls them on a thread (`asyncio.to_thread`), never on its event loop, since a
    summary over a year of rows takes seconds. Reads run on their own connection under a
    time limit (`read_timeout_s`; past it `db.reads.ReadTimeout`), so they never block the
    writer nor hang their caller.
    """

    dialect = ""

    def __new__(cls, url: str) -> UsageStore:
        # Like pathlib.Path: the base class constructs the URL's backend.
        return super().__new__(_backend(url) if cls is UsageStore else cls)

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: queue.Queue[UsageRecord | None] = queue.Queue(MAX_QUEUE_ROWS)
        self._flushed = threading.Condition()
        self._submitted = 0
        self._committed = 0  # written or given up on: what flush() waits for
        self.dropped = 0  # rows lost: queue full, refused by the database, or store down
        self.refused_rows = 0  # of those, rows the database refused (dropped alone)
        self._failed_batches = 0
        self._isolated_rows = 0  # rows of the batch being isolated committed so far
        self._refusal_logged_s = -REFUSAL_LOG_INTERVAL_S
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self.read_timeout_s: float | None = READ_TIMEOUT_S

    def _start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ writes

    def submit(self, record: UsageRecord) -> None:
        """Queue a record; never blocks the event loop. A full queue is counted, not hidden."""
        try:
            self._queue.put_nowait(record)
            self._submitted += 1
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is committed. False on timeout or when a
        batch in the meantime could not be written (its rows are counted in `dropped`)."""
        target = self._submitted
        failed = self._failed_batches
        deadline = time.monotonic() + timeout_s
        with self._flushed:
            while self._committed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._flushed.wait(left)
        return self._failed_batches == failed

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._close_connections()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH_ROWS:
                try:
                    item = self._queue.get(timeout=FLUSH_INTERVAL_S if len(batch) < 8 else 0)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._isolated_rows = 0
            try:
                lost = self._write_isolating([usage_row(r) for r in batch])
            except Exception:
                # The backend has retried already. Keep the writer alive for the next batches
                # and say what was lost, rather than die and silently drop everything after.
                lost = len(batch) - self._isolated_rows
                log.exception("usage store: dropped %d rows, the store is unavailable", lost)
            if lost:
                self.dropped += lost
                self._failed_batches += 1
            with self._flushed:
                self._committed += len(batch)
                self._flushed.notify_all()

    def _write_isolating(self, rows: list[tuple[Any, ...]], whole: bool = True) -> int:
        """Commit the rows but those the database refuses; returns how many it refused.
        Halves until each refused row is alone: k refused rows among n cost about
        2k log2(n) small transactions (the ledger's writer isolates its rows the same way)."""
        try:
            self._write(rows)
        except Exception as exc:
            if not self.refuses(exc):
                raise
            if len(rows) == 1:
                self._refused(rows[0], exc)
                return 1
            if whole:
                log.warning("usage store: a row of a batch was refused; isolating it: %r", exc)
            mid = len(rows) // 2
            return self._write_isolating(rows[:mid], False) + self._write_isolating(
                rows[mid:], False
            )
        self._isolated_rows += len(rows)
        return 0

    def _refused(self, row: tuple[Any, ...], exc: BaseException) -> None:
        self.refused_rows += 1
        now_s = time.monotonic()
        if now_s - self._refusal_logged_s >= REFUSAL_LOG_INTERVAL_S:  # a flood logs once
            self._refusal_logged_s = now_s
            log.error(
                "usage store: the row of request %r cannot be stored and is dropped: %r"
                " (%d so far)", row[0], exc, self.refused_rows,
            )  # fmt: skip

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """Commit the rows in one transaction (existing request_ids are ignored); a refused
        value raises at once, with nothing committed."""
        raise NotImplementedError

    def refuses(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by `_write`, is the database refusing a value of the rows
        (the same rows would fail again), rather than the store being unavailable."""
        raise NotImplementedError

    def _fetch(
        self, sql: str, params: list[Any], timeout_s: float | None
    ) -> Sequence[Mapping[str, Any]]:
        """The rows of a read, stopped with `ReadTimeout` past `timeout_s` (None: no limit)."""
        raise NotImplementedError

    def _close_connections(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ reads

    def query(
        self,
        group_by: Iterable[str] = (),
        since_ms: int | None = None,
        until_ms: int | None = None,
        key_id: str | None = None,
        *,
        use_rollup: bool = True,
    ) -> list[Summary]:
        """Requests and sums per group in [since, until). The whole days of the window that
        are rolled up (`rollup.py`) are read from `usage_daily`, the rest from the raw rows;
        `use_rollup=False` reads raw rows only (what the roll-up must equal)."""
        groups = list(group_by)
        sql, params = query_sql(self.dialect, groups, since_ms, until_ms, key_id)
        watermark = (
            self._fetch(rollup.WATERMARK_QUERY, [], self.read_timeout_s) if use_rollup else []
        )
        span = rollup.split_window(
            since_ms, until_ms, watermark[0]["until_ms"] if watermark else None
        )
        if span is not None:
            raw_expr = {g: group_expr(g, self.dialect) for g in groups}
            sql, params = rollup.combined_sql(
                self.dialect, groups, raw_expr, since_ms, until_ms, span, key_id,
                PLACEHOLDER[self.dialect],
            )  # fmt: skip
        return summaries(groups, self._fetch(sql, params, self.read_timeout_s))

    def query_page(
        self,
        group_by: Iterable[str],
        since_ms: int | None = None,
        until_ms: int | None = None,
        key_id: str | None = None,
        *,
        limit: int,
        after: Any = None,
        use_rollup: bool = True,
    ) -> SummaryPage:
        """`query`, one page at a time: the groups of the first `limit` values of the first
        group after `after`, each with all its rows. A page reads its own values by index
        (the roll-up's first-group indexes; the raw rows after the watermark by time), so
        a summary of 100,000 keys is many short reads, none of which the paying traffic
        waits behind, rather than one that runs past the read limit. `day` first pages by
        `limit` calendar days."""
        groups = list(group_by)
        assert groups and 1 <= limit <= MAX_PAGE_VALUES, (groups, limit)
        first = groups[0]
        group_expr(first, self.dialect)  # an unknown group is a ValueError, as in `query`
        if first == "day":
            return self._day_page(groups, since_ms, until_ms, key_id, limit, after, use_rollup)
        column = GROUPS[first]
        watermark = (
            self._fetch(rollup.WATERMARK_QUERY, [], self.read_timeout_s) if use_rollup else []
        )
        span = rollup.split_window(
            since_ms, until_ms, watermark[0]["until_ms"] if watermark else None
        )
        # The page ends at the limit-th value of the roll-up (or, with none, of the raw
        # rows); the raw days beside the roll-up add values up to there, trimmed below.
        values = self._next_values(column, since_ms, until_ms, key_id, span, after, limit)
        more = len(values) > limit
        page = (column, after, values[limit - 1] if more else None)
        if span is None:
            sql, params = query_sql(self.dialect, groups, since_ms, until_ms, key_id, page)
        else:
            raw_expr = {g: group_expr(g, self.dialect) for g in groups}
            sql, params = rollup.combined_sql(
                self.dialect, groups, raw_expr, since_ms, until_ms, span, key_id,
                PLACEHOLDER[self.dialect], page,
            )  # fmt: skip
        rows = summaries(groups, self._fetch(sql, params, self.read_timeout_s))
        # Both sources' values up to `upper` can be twice the limit: keep the first `limit`.
        seen, last = 0, None
        for i, row in enumerate(rows):
            value = row.group[first]
            if value is None or value == last:
                continue
            if seen == limit:
                return SummaryPage(rows[:i], True, last)
            seen, last = seen + 1, value
        return SummaryPage(rows, more, last)

    def _next_values(
        self,
        column: str,
        since_ms: int | None,
        until_ms: int | None,
        key_id: str | None,
        span: tuple[int | None, int] | None,
        after: Any,
        limit: int,
    ) -> list[Any]:
        """The first `limit + 1` values of `column` after `after`, in order: the roll-up's
        when part of the window is rolled up (the raw days beside it add values up to the
        page's end, which `query_page` keeps the first `limit` of, so reading them here
        would read those days twice), else the raw rows'. The roll-up's key and account
        are read by a skip scan of their index (`rollup.next_values_sql`): one probe a
        value, however many rows each value has and whether or not the planner has
        statistics yet."""
        ph = PLACEHOLDER[self.dialect]
        if span is not None:
            conds, params = rollup.daily_window(span, key_id, ph)
            table = "usage_daily"
            if column in rollup.PAGE_INDEXED:
                sql, params = rollup.next_values_sql(
                    self.dialect, column, conds, params, after, limit + 1, ph
                )
                return [r["v"] for r in self._fetch(sql, params, self.read_timeout_s)]
        else:
            where, params = _where(ph, since_ms, until_ms, key_id)
            conds = [where.removeprefix(" WHERE ")] if where else []
            table = "usage"
        col = column + rollup.collation(self.dialect, column)
        conds.append(f"{col} > {ph}" if after is not None else f"{column} IS NOT NULL")
        params += [after] if after is not None else []
        sql = (
            f"SELECT DISTINCT {col} AS v FROM {table} WHERE {' AND '.join(conds)}"
            f" ORDER BY v LIMIT {ph}"
        )
        return [r["v"] for r in self._fetch(sql, [*params, limit + 1], self.read_timeout_s)]

    def _day_page(
        self,
        groups: list[str],
        since_ms: int | None,
        until_ms: int | None,
        key_id: str | None,
        limit: int,
        after: Any,
        use_rollup: bool,
    ) -> SummaryPage:
        """A page of `limit` calendar days: the window narrowed to them (a day's rows come
        from the time index or the roll-up's day index)."""
        edges = [self._fetch(sql, [], self.read_timeout_s)[0] for sql in DAY_PAGE_EDGES]
        firsts = [edges[0]["lo"]] + ([day_ms(edges[1]["lo"])] if edges[1]["lo"] else [])
        lasts = [edges[0]["hi"]] + ([day_ms(edges[1]["hi"])] if edges[1]["hi"] else [])
        if not [t for t in firsts if t is not None]:
            return SummaryPage([], False, None)
        lo = rollup.day_start_ms(min(t for t in firsts if t is not None))
        if after is not None:
            lo = max(lo, day_ms(str(after)) + rollup.DAY_MS)
        if since_ms is not None:
            lo = max(lo, since_ms)
        hi = rollup.day_start_ms(lo) + limit * rollup.DAY_MS
        if until_ms is not None:
            hi = min(hi, until_ms)
        if lo >= hi:
            return SummaryPage([], False, None)
        rows = self.query(groups, lo, hi, key_id, use_rollup=use_rollup)
        latest = max(t for t in lasts if t is not None)
        more = latest >= hi and (until_ms is None or hi < until_ms)
        return SummaryPage(rows, more, rollup.day_of(hi - 1))

    def records(
        self, since_ms: int | None = None, until_ms: int | None = None, limit: int = 1_000_000
    ) -> list[UsageRecord]:
        sql, params = records_sql(self.dialect, since_ms, until_ms, limit)
        return [record_from_row(r) for r in self._fetch(sql, params, None)]

    def iter_records(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
        page_rows: int = RECORDS_PAGE_ROWS,
    ) -> Iterator[UsageRecord]:
        """Every record in range, in (ts_ms, request_id) order, fetched `page_rows` at a
        time (each page a short read of its own): any number of rows in one page's memory."""
        after: tuple[int, str] | None = None
        while True:
            sql, params = records_sql(self.dialect, since_ms, until_ms, page_rows, after)
            page = self._fetch(sql, params, None)
            yield from (record_from_row(r) for r in page)
            if len(page) < page_rows:
                return
            after = (page[-1]["ts_ms"], page[-1]["request_id"])


# ---------------------------------------------------------------------- SQLite


class SqliteUsageStore(UsageStore):
    """The usage table in SQLite (WAL): a writer connection and a reader connection."""

    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        ddl = USAGE.ddl("sqlite") + rollup.ddl("sqlite")
        self._write_conn = connect_rows(self.path, ddl)
        columns = [row["name"] for row in self._write_conn.execute("PRAGMA table_info(usage)")]
        for stmt in upgrade_sql("sqlite", columns):
            self._write_conn.execute(stmt)
        self._read_conn = (
            self._write_conn if self.path == ":memory:" else connect_rows(self.path, ddl)
        )
        self._read_lock = threading.Lock()
        # More read connections (WAL readers), opened as concurrent reads need them.
        self._readers: ReadPool[sqlite3.Connection] | None = (
            None
            if self.path == ":memory:"
            else ReadPool(
                lambda: connect_rows(self.path, ()),
                sqlite3.Connection.close,
                READERS,
                first=self._read_conn,
            )
        )
        placeholders = ",".join("?" * len(USAGE_COLUMNS))
        self._insert_sql = (
            f"INSERT OR IGNORE INTO usage ({','.join(USAGE_COLUMNS)}) VALUES ({placeholders})"
        )
        self._start()

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        for attempt in range(5):
            try:
                shared = self._read_conn is self._write_conn
                with self._read_lock if shared else contextlib.nullcontext():
                    try:
                        self._write_conn.execute("BEGIN IMMEDIATE")
                        self._write_conn.executemany(self._insert_sql, rows)
                        self._write_conn.execute("COMMIT")
                    except BaseException:
                        # Rows bound before a refused one are undone with it.
                        if self._write_conn.in_transaction:
                            self._write_conn.execute("ROLLBACK")
                        raise
                return
            except sqlite3.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def refuses(self, exc: BaseException) -> bool:
        return isinstance(exc, SQLITE_REFUSALS)

    def _fetch(
        self, sql: str, params: list[Any], timeout_s: float | None
    ) -> list[Mapping[str, Any]]:
        if self._readers is None:  # in memory: the writer's connection, behind the lock
            with self._read_lock, sqlite_deadline(self._read_conn, timeout_s):
                return fetch_yielding(self._read_conn.execute(sql, params))
        with self._readers.conn() as conn, sqlite_deadline(conn, timeout_s):
            return fetch_yielding(conn.execute(sql, params))

    def _close_connections(self) -> None:
        self._write_conn.close()
        if self._readers is not None:
            self._readers.close()  # the first reader among them


__all__ = [
    "ADDED_COLUMNS",
    "GROUPS",
    "SUMS",
    "USAGE",
    "USAGE_COLUMNS",
    "USAGE_SCHEMA",
    "SqliteUsageStore",
    "Summary",
    "UsageStore",
    "open_usage_store",
    "record_from_row",
    "usage_row",
]
