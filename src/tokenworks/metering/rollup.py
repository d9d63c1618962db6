"""Daily roll-ups of the usage table, and the summary query that reads them.

`usage_daily` holds, per UTC day and per (key, account, model, producer, upstream model,
status), the request count and every summed column of `usage` (`store.SUMS`). Every group
a summary can ask for (`store.GROUPS`) is one of those columns or the day, so a summary of
whole days reads the roll-up and gives the raw rows' answer.

Why a job over closed days and not the writers: usage rows reach the table by two paths
(attached to the ledger's commit, and the usage store's own writer), and on PostgreSQL the
ledger's commit is one JSON statement; keeping a roll-up in step there would put a second
write on the hot path of every settlement. A day closes once, so rolling it up after it has
closed (plus `GRACE_MS` for the last streams) is one GROUP BY over an index range, off the
hot path, and idempotent: a day is rolled up by replacing its roll-up rows, so a repeat
(or a re-roll after a late row) cannot count twice.

`usage_rollup` keeps one watermark, `until_ms`: every day before it is in `usage_daily`.
A summary takes the whole days of its window that lie before the watermark from the
roll-up and the rest (partial days at the edges, days not yet rolled) from the raw rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

DAY_MS = 86_400_000
# A request's row carries its start time, and it is written when it ends: a day is rolled up
# this long after its end, when no stream of it can still be running.
GRACE_MS = 3_600_000

# The columns a day is rolled up by; with `day`, they cover every summary group.
KEYS = ("key_id", "account_id", "public_model", "producer", "upstream_model", "status")
SUMS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nano",
    "price_nano",
    "clamped_nano",
)
DAILY_COLUMNS = ("day", *KEYS, "requests", *SUMS)

# No primary key: the group columns may be NULL (a request without a key or producer), and a
# day's rows are only ever replaced as a whole.
DDL = [
    "CREATE TABLE IF NOT EXISTS usage_daily (day TEXT NOT NULL, key_id TEXT, account_id TEXT,"
    " public_model TEXT NOT NULL, producer TEXT, upstream_model TEXT, status INTEGER NOT NULL,"
    " requests BIGINT NOT NULL, " + ", ".join(f"{s} BIGINT NOT NULL" for s in SUMS) + ")",
    "CREATE INDEX IF NOT EXISTS usage_daily_day ON usage_daily (day)",
    "CREATE INDEX IF NOT EXISTS usage_daily_key_day ON usage_daily (key_id, day)",
    "CREATE TABLE IF NOT EXISTS usage_rollup (name TEXT PRIMARY KEY, until_ms BIGINT NOT NULL)",
]

# Paged summaries (`store.UsageStore.query_page`) walk a first group's values in order, by
# index. PostgreSQL orders text by code point (`COLLATE "C"`, as both dialects answer), and
# an index only serves the collation it was built with: these are built with it.
PAGE_INDEXES = {
    "sqlite": [
        "CREATE INDEX IF NOT EXISTS usage_daily_account_day ON usage_daily (account_id, day)",
    ],
    "postgres": [
        'CREATE INDEX IF NOT EXISTS usage_daily_key_c ON usage_daily (key_id COLLATE "C", day)',
        "CREATE INDEX IF NOT EXISTS usage_daily_account_c ON usage_daily"
        ' (account_id COLLATE "C", day)',
    ],
}


PAGE_INDEXED = ("key_id", "account_id")  # the first groups `PAGE_INDEXES` serve


def ddl(dialect: str) -> list[str]:
    return DDL + PAGE_INDEXES[dialect]


def next_values_sql(
    dialect: str,
    column: str,
    window: list[str],
    params: list[Any],
    after: Any,
    count: int,
    ph: str,
) -> tuple[str, list[Any]]:
    """The first `count` values of an indexed roll-up column after `after` (None: the
    first), in the window's rows: a skip scan, each value the next after the last by one
    probe of the index (`PAGE_INDEXES`). A DISTINCT would read every row of the values it
    returns, and without statistics PostgreSQL plans it as a scan of the whole table."""
    assert column in PAGE_INDEXED, column
    col = column + collation(dialect, column)
    where = " AND ".join(window)
    first = f"{col} > {ph}" if after is not None else f"{column} IS NOT NULL"
    probe = f"SELECT {col} FROM usage_daily WHERE {where} AND {{lower}} ORDER BY 1 LIMIT 1"
    sql = (
        f"WITH RECURSIVE walk(v, n) AS (SELECT ({probe.format(lower=first)}), 1"
        f" UNION ALL SELECT ({probe.format(lower=f'{col} > walk.v')}), n + 1 FROM walk"
        f" WHERE walk.v IS NOT NULL AND n < {ph})"
        " SELECT v FROM walk WHERE v IS NOT NULL"
    )
    first_params = [*params, *([after] if after is not None else [])]
    return sql, [*first_params, *params, count]


def day_of(ms: int) -> str:
    """The UTC day of an instant, as the summary's `day` group spells it (YYYY-MM-DD)."""
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime("%Y-%m-%d")


def day_start_ms(ms: int) -> int:
    return ms - ms % DAY_MS


def day_ceil_ms(ms: int) -> int:
    return -(-ms // DAY_MS) * DAY_MS


def closed_until_ms(now_ms: int) -> int:
    """The end of the last day that may be rolled up at `now_ms`."""
    return day_start_ms(now_ms - GRACE_MS)


# ---------------------------------------------------------------------- rolling up


def day_rows_sql(ph: str) -> str:
    """A day's roll-up rows from its raw rows (parameters: day text, start ms, end ms). A
    read: on SQLite it takes no write lock, so the writers go on while it runs."""
    keys = ", ".join(KEYS)
    # Every column named: rows may come back as dicts.
    sums = ", ".join(f"COALESCE(SUM({s}), 0) AS {s}" for s in SUMS)
    return (
        f"SELECT {ph} AS day, {keys}, COUNT(*) AS requests, {sums} FROM usage "
        f"WHERE ts_ms >= {ph} AND ts_ms < {ph} GROUP BY {keys}"
    )


def replace_day_sql(ph: str) -> tuple[str, str]:
    """(delete a day's roll-up rows, insert one): run in one short transaction."""
    marks = ", ".join([ph] * len(DAILY_COLUMNS))
    return (
        f"DELETE FROM usage_daily WHERE day = {ph}",
        f"INSERT INTO usage_daily ({', '.join(DAILY_COLUMNS)}) VALUES ({marks})",
    )


def watermark_sql(ph: str) -> str:
    return (
        f"INSERT INTO usage_rollup (name, until_ms) VALUES ('usage', {ph}) "
        "ON CONFLICT (name) DO UPDATE SET until_ms = excluded.until_ms"
    )


WATERMARK_QUERY = "SELECT until_ms FROM usage_rollup WHERE name = 'usage'"
FIRST_ROW_QUERY = "SELECT MIN(ts_ms) AS ts_ms FROM usage"


def day_counts_sql(ph: str) -> tuple[str, str]:
    """(raw rows of a day, rolled-up requests of a day): equal when the roll-up is current."""
    return (
        f"SELECT COUNT(*) AS n FROM usage WHERE ts_ms >= {ph} AND ts_ms < {ph}",
        f"SELECT COALESCE(SUM(requests), 0) AS n FROM usage_daily WHERE day = {ph}",
    )


# ---------------------------------------------------------------------- reading


def split_window(
    since_ms: int | None, until_ms: int | None, watermark_ms: int | None
) -> tuple[int | None, int] | None:
    """The span [start, end) of whole rolled-up days inside the window (start None: from
    the first day), or None when the window holds no such day."""
    if watermark_ms is None:
        return None
    start = None if since_ms is None else day_ceil_ms(since_ms)
    end = watermark_ms if until_ms is None else min(day_start_ms(until_ms), watermark_ms)
    if start is not None and start >= end:
        return None
    return start, end


# A page of a summary (`store.UsageStore.query_page`): the stored column of its first group,
# the value after which it starts (None: from the first, NULL included) and the value it
# ends with, included (None: no end).
PageRange = tuple[str, Any, Any]


def collation(dialect: str, column: str) -> str:
    """What orders a text column by code point, as both dialects answer (SQLite's BINARY)."""
    return ' COLLATE "C"' if dialect == "postgres" and column != "status" else ""


def page_condition(dialect: str, page: PageRange, ph: str) -> tuple[str, list[Any]]:
    """The condition that keeps a page's rows."""
    column, after, upper = page
    col = column + collation(dialect, column)
    conds: list[str] = []
    params: list[Any] = []
    if after is not None:
        conds.append(f"{col} > {ph}")
        params.append(after)
    if upper is not None:
        conds.append(f"{col} <= {ph}")
        params.append(upper)
        if after is None:  # the first page: NULL sorts first, so it is this page's
            conds[-1] = f"({column} IS NULL OR {conds[-1]})"
    return " AND ".join(conds) or "TRUE", params


def combined_sql(
    dialect: str,
    groups: Sequence[str],
    raw_expr: dict[str, str],
    since_ms: int | None,
    until_ms: int | None,
    span: tuple[int | None, int],
    key_id: str | None,
    ph: str,
    page: PageRange | None = None,
) -> tuple[str, list[Any]]:
    """A summary over the raw rows outside `span` and the roll-up inside it, grouped and
    ordered as the raw-rows summary is (`store.query_sql`); `page` keeps one page of it."""
    raw_where, params = raw_window(since_ms, until_ms, span, key_id, ph)
    daily_where, daily_params = daily_window(span, key_id, ph)
    if page is not None:  # the same column and values in both sources
        cond, cond_params = page_condition(dialect, page, ph)
        raw_where.append(cond)
        params += cond_params
        daily_where.append(cond)
        daily_params += cond_params
    params += daily_params
    raw_select = [f"{raw_expr[g]} AS {g}" for g in groups]
    raw_select += ["COUNT(*) AS requests"] + [f"COALESCE(SUM({s}), 0) AS {s}" for s in SUMS]
    raw = f"SELECT {', '.join(raw_select)} FROM {raw_rows(dialect)} WHERE {' AND '.join(raw_where)}"
    daily_select = [f"{_daily_column(g)} AS {g}" for g in groups]
    daily_select += ["SUM(requests) AS requests"] + [f"SUM({s}) AS {s}" for s in SUMS]
    daily = f"SELECT {', '.join(daily_select)} FROM usage_daily WHERE {' AND '.join(daily_where)}"
    if groups:
        raw += " GROUP BY " + ", ".join(raw_expr[g] for g in groups)
        daily += " GROUP BY " + ", ".join(_daily_column(g) for g in groups)
    outer = [*groups, "COALESCE(SUM(requests), 0) AS requests"]
    outer += [f"COALESCE(SUM({s}), 0) AS {s}" for s in SUMS]
    sql = f"SELECT {', '.join(outer)} FROM ({raw} UNION ALL {daily}) AS both_sources"
    if groups:
        sql += " GROUP BY " + ", ".join(groups)
        sql += " ORDER BY " + ", ".join(_order(g, dialect) for g in groups)
    return sql, params


def raw_rows(dialect: str) -> str:
    """The raw rows beside the roll-up: a few days, read by time. Without statistics,
    SQLite would rather walk a grouped column's index (`usage_key_ts`) for its order, which
    is every row the table holds: 10M rows a summary at a year of traffic."""
    return "usage INDEXED BY usage_ts" if dialect == "sqlite" else "usage"


def raw_window(
    since_ms: int | None,
    until_ms: int | None,
    span: tuple[int | None, int],
    key_id: str | None,
    ph: str,
) -> tuple[list[str], list[Any]]:
    """The raw rows a summary reads beside the roll-up's `span`: [since, start) and
    [end, until), a few partial or not yet rolled-up days."""
    start, end = span
    if since_ms is not None and start is not None:  # start is None exactly when since is
        where = [f"((ts_ms >= {ph} AND ts_ms < {ph}) OR ts_ms >= {ph})"]
        params: list[Any] = [since_ms, start, end]
    else:
        where, params = [f"ts_ms >= {ph}"], [end]
    if until_ms is not None:
        where.append(f"ts_ms < {ph}")
        params.append(until_ms)
    if key_id is not None:
        where.append(f"key_id = {ph}")
        params.append(key_id)
    return where, params


def daily_window(
    span: tuple[int | None, int], key_id: str | None, ph: str
) -> tuple[list[str], list[Any]]:
    """The roll-up's rows of the days [start, end)."""
    start, end = span
    where, params = [f"day < {ph}"], [day_of(end)]
    if start is not None:
        where.append(f"day >= {ph}")
        params.append(day_of(start))
    if key_id is not None:
        where.append(f"key_id = {ph}")
        params.append(key_id)
    return where, params


def _daily_column(group: str) -> str:
    return {"key": "key_id", "model": "public_model", "account": "account_id"}.get(group, group)


def _order(group: str, dialect: str) -> str:
    # As store._order: NULL first, text by code point on both dialects.
    return f"{group}{collation(dialect, group)} NULLS FIRST"


__all__ = [
    "DAILY_COLUMNS",
    "DAY_MS",
    "DDL",
    "GRACE_MS",
    "closed_until_ms",
    "combined_sql",
    "day_of",
    "split_window",
]
