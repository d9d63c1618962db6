"""The usage table partitioned by month on PostgreSQL: made ahead by the writer, dropped
whole by retention; an older unpartitioned table keeps working."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import PG_URL
from tests.metering.test_rollup import DAY0_MS, _fill
from tests.metering.test_stores import record
from tokenworks.db import split_schema
from tokenworks.metering import partitions
from tokenworks.metering.retention import UsageRetention
from tokenworks.metering.rollup import DAY_MS
from tokenworks.metering.store import USAGE, open_usage_store

pytestmark = pytest.mark.parametrize("database", ["postgres"], indirect=True)


@pytest.fixture
def pg(database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    _, schema = split_schema(database)
    with psycopg.connect(PG_URL, autocommit=True, options=f"-c search_path={schema}") as c:
        c.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        yield c


def test_a_new_table_is_partitioned_with_next_month_ahead(database: str) -> None:
    store = open_usage_store(database)
    try:
        assert store.partitioned  # type: ignore[attr-defined]
        now = partitions.month_start_ms(int(time.time() * 1000))
        names = partitions.months(store._write_conn)  # type: ignore[attr-defined]
        nxt = partitions.next_month_ms(now)
        assert [partitions.name_of(now), partitions.name_of(nxt)] == names
        # At the turn of the month the writer makes the one after, before a row needs it.
        store._ensure_partitions(nxt + 1000)  # type: ignore[attr-defined]
        after = partitions.name_of(partitions.next_month_ms(nxt))
        assert after in partitions.months(store._write_conn)  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_new_month_waits_for_inserts_in_flight(
    database: str, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    """The ledger's commits insert usage rows beside the usage writer: a month is attached
    only with the table locked against them (one routed to the default partition before
    the ATTACH and written after it would be refused), and waits for its turn when the
    table stays busy, rather than attach under an insert in flight."""
    store = open_usage_store(database)
    try:
        now = partitions.month_start_ms(int(time.time() * 1000))
        later = partitions.next_month_ms(partitions.next_month_ms(now))
        with pg.transaction():  # an insert in flight: the lock an INSERT takes, held
            pg.execute("LOCK TABLE ONLY usage IN ROW EXCLUSIVE MODE")
            store._ensure_partitions(later + 1000)  # type: ignore[attr-defined]
        assert partitions.name_of(later) not in partitions.months(pg)
        store._ensure_partitions(later + 1000)  # type: ignore[attr-defined]
        assert partitions.name_of(later) in partitions.months(pg)
    finally:
        store.close()


def test_retention_drops_whole_months(database: str) -> None:
    store = open_usage_store(database)
    job = UsageRetention(database)
    try:
        # Rows of 2024-03-30 .. 2024-05-08, written before their months had partitions:
        # they wait in the default partition, and move when their month is made.
        _fill(store, 400, seed=11, span_days=40)
        assert job._value("SELECT COUNT(*) FROM usage_default") == 400
        partitions.ensure(job._pg, DAY0_MS + 40 * DAY_MS, DAY0_MS)
        names = partitions.months(job._pg)
        assert {"usage_p202403", "usage_p202404", "usage_p202405"} <= set(names)
        assert job._value("SELECT COUNT(*) FROM usage_default") == 0
        want = store.query(group_by=["day", "model"], use_rollup=False)
        job.roll_up(DAY0_MS + 60 * DAY_MS, max_days=31)
        # 31 days a call: April is not rolled up whole yet, so only March goes.
        assert job.expire(DAY0_MS + 34 * DAY_MS) == 1
        job.roll_up(DAY0_MS + 60 * DAY_MS, max_days=31)
        # Retention up to 2024-05-03: April goes too, May stays whole.
        assert job.expire(DAY0_MS + 34 * DAY_MS) == 1  # a partition, no row one by one
        names = partitions.months(job._pg)
        assert "usage_p202403" not in names and "usage_p202404" not in names
        assert "usage_p202405" in names
        assert store.query(group_by=["day", "model"]) == want
        assert store.records(until_ms=DAY0_MS + 32 * DAY_MS) == []
        assert len(store.records(since_ms=DAY0_MS + 32 * DAY_MS)) > 0
    finally:
        job.close()
        store.close()


def test_an_unpartitioned_table_keeps_working(
    database: str, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    # What an earlier version made: a plain table keyed by request_id.
    for stmt in USAGE.ddl("postgres"):
        pg.execute(stmt)
    store = open_usage_store(database)
    job = UsageRetention(database)
    try:
        assert not store.partitioned  # type: ignore[attr-defined]
        _fill(store, 200, seed=4, span_days=5)
        store.submit(record(0, random.Random(0), ts_ms=DAY0_MS))  # a repeat
        assert store.flush()
        assert store.query(use_rollup=False)[0].requests == 200
        want = store.query(group_by=["day"], use_rollup=False)
        job.roll_up(DAY0_MS + 10 * DAY_MS)
        assert job.expire(DAY0_MS + 3 * DAY_MS, batch_rows=25) > 0
        assert store.records(until_ms=DAY0_MS + 3 * DAY_MS) == []
        assert store.query(group_by=["day"]) == want
        row = pg.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass('usage')")
        assert row.fetchone() == ("r",)
    finally:
        job.close()
        store.close()
