"""A grouped usage summary read a page at a time is the whole summary, in order, on SQLite
and PostgreSQL: whatever the window, the groups, the key filter, how much is rolled up and
the page size (hypothesis), and each page holds at most `limit` values of the first group."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import both_stores
from tests.metering.test_rollup import DAY0_MS, _clear, edges
from tests.metering.test_stores import record
from tokenworks.metering.retention import UsageRetention
from tokenworks.metering.rollup import DAY_MS, GRACE_MS
from tokenworks.metering.store import GROUPS, Summary, UsageStore, open_usage_store

pytestmark = both_stores

KEYS = [f"key_{i:02d}" for i in range(23)]
MAX_PAGES = 200  # a walk that has not ended by then is not going to


def _fill(store: UsageStore, n: int, seed: int) -> None:
    """Rows over 6 days with many keys and accounts (a NULL of each too), so pages differ."""
    rng = random.Random(seed)
    for i in range(n):
        r = record(i, rng, ts_ms=DAY0_MS + rng.randrange(0, 6 * DAY_MS))
        r.key_id = rng.choice([*KEYS, None])
        r.account_id = rng.choice([str(a) for a in range(1, 15)] + [None])
        store.submit(r)
    assert store.flush()


def walk(store: UsageStore, groups: list[str], limit: int, **window: Any) -> list[Summary]:
    rows: list[Summary] = []
    after = None
    for _ in range(MAX_PAGES):
        page = store.query_page(groups, limit=limit, after=after, **window)
        firsts = {r.group[groups[0]] for r in page.rows} - {None}
        if groups[0] == "day" and firsts:  # a page of `limit` calendar days
            span_ms = max(map(_day_ms, firsts)) - min(map(_day_ms, firsts))
            assert span_ms < limit * DAY_MS, firsts
        else:
            assert len(firsts) <= limit, (limit, firsts)
        rows += page.rows
        if not page.has_more:
            return rows
        assert page.last is not None and (after is None or _above(page.last, after))
        after = page.last
    raise AssertionError("the pages never ended")


def _day_ms(day: str) -> int:
    from tokenworks.metering.store import day_ms

    return day_ms(day)


def _above(value: Any, after: Any) -> bool:
    return bool(value > after)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(0, 120),
    seed=st.integers(0, 2**16),
    first=st.sampled_from(sorted(GROUPS)),
    rest=st.lists(st.sampled_from(sorted(GROUPS)), unique=True, max_size=2),
    since=edges,
    until=edges,
    key=st.sampled_from([None, "key_03"]),
    rolled_days=st.integers(0, 8),
    limit=st.integers(1, 6),
)
def test_pages_add_up_to_the_whole_summary(
    stores: tuple[UsageStore, UsageRetention],
    n: int,
    seed: int,
    first: str,
    rest: list[str],
    since: int | None,
    until: int | None,
    key: str | None,
    rolled_days: int,
    limit: int,
) -> None:
    store, job = stores
    _clear(job)
    _fill(store, n, seed)
    job.roll_up(DAY0_MS + rolled_days * DAY_MS + GRACE_MS, max_days=40)
    groups = [first, *(g for g in rest if g != first)]
    window = {"since_ms": since, "until_ms": until, "key_id": key}
    whole = store.query(groups, **window)  # type: ignore[arg-type]
    assert walk(store, groups, limit, **window) == whole
    assert walk(store, groups, limit, **window, use_rollup=False) == whole


def test_a_page_reads_its_own_keys_by_index(stores: tuple[UsageStore, UsageRetention]) -> None:
    """The bound of a page comes from a skip scan of the roll-up's key index that stops at
    the limit, not from a scan of every row: the plan names the index, and no scan."""
    store, job = stores
    _clear(job)
    _fill(store, 300, seed=5)
    job.roll_up(DAY0_MS + 7 * DAY_MS + GRACE_MS, max_days=40)
    seen: list[str] = []
    fetch = store._fetch  # type: ignore[attr-defined]

    def explain(sql: str, params: list[Any], timeout_s: float | None) -> Any:
        if "WITH RECURSIVE walk" in sql:
            prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
            seen.extend(str(dict(r)) for r in fetch(prefix + sql, params, timeout_s))
        return fetch(sql, params, timeout_s)

    store._fetch = explain  # type: ignore[attr-defined]
    if store.dialect == "postgres":
        # A few hundred rows: a scan is cheaper, so make the index the planner's choice (one
        # thread here: the read pool hands back the same connection, which keeps the setting).
        fetch("SELECT set_config('enable_seqscan', 'off', false) AS s", [], None)
    page = store.query_page(["key"], limit=4)
    assert page.has_more and [r.group["key"] for r in page.rows] == [None, *KEYS[:4]]
    plan = " ".join(seen)
    index = "usage_daily_key_day" if store.dialect == "sqlite" else "usage_daily_key_c"
    assert index in plan, plan
    assert "SCAN usage_daily" not in plan and "Seq Scan" not in plan, plan


def test_sqlite_reads_the_raw_days_beside_the_rollup_by_time(database: str) -> None:
    """The raw rows a rolled-up summary adds are the days after the watermark: read by the
    time index, never by a walk of the key index through every row of the table (which
    SQLite, without statistics, chose for the GROUP BY's order: a year of rows a summary)."""
    import sqlite3

    from tokenworks.metering import rollup

    if not database.startswith("sqlite"):
        pytest.skip("the plan asserted is SQLite's; PostgreSQL's planner weighs statistics")
    open_usage_store(database).close()
    conn = sqlite3.connect(database.removeprefix("sqlite:///"))
    try:
        span = rollup.split_window(None, None, DAY0_MS)
        assert span is not None
        for page in (None, ("key_id", None, "key_05"), ("key_id", "key_05", None)):
            sql, params = rollup.combined_sql(
                "sqlite", ["key", "model"], {"key": "key_id", "model": "public_model"},
                None, None, span, None, "?", page,
            )  # fmt: skip
            plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            raw = [p for p in plan if " usage " in f"{p} " and "usage_daily" not in p]
            assert raw == ["SEARCH usage USING INDEX usage_ts (ts_ms>?)"], plan
    finally:
        conn.close()
