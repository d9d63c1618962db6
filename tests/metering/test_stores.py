"""The usage store and the key store over real connections, on SQLite and on PostgreSQL.

PostgreSQL tests skip loudly when no server answers at TOKENWORKS_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/test), and fail instead when CI=true.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import PG_URL, both_stores
from tokenworks.db import split_schema
from tokenworks.db.postgres import connect as pg_connect
from tokenworks.db.table import Table
from tokenworks.keys.store import KeyStore
from tokenworks.metering.store import (
    GROUPS,
    USAGE_COLUMNS,
    USAGE_SCHEMA,
    SqliteUsageStore,
    UsageStore,
    open_usage_store,
    usage_row,
)
from tokenworks.metering.store_postgres import PostgresUsageStore
from tokenworks.metering.usage import Usage, UsageRecord

DAY_MS = 86_400_000
# 2024-03-30 23:59:59.500 UTC: records either side of UTC midnight land on different days.
T0_MS = 1_711_843_199_500


def record(i: int, rng: random.Random, ts_ms: int | None = None) -> UsageRecord:
    out = rng.randrange(0, 500)
    return UsageRecord(
        request_id=f"req-{i:06d}",
        ts_ms=ts_ms if ts_ms is not None else T0_MS + rng.randrange(-2 * DAY_MS, 2 * DAY_MS),
        key_id=rng.choice(["key_a", "key_b", None]),
        account_id=rng.choice(["1", "2", None]),
        public_model=rng.choice(["chat-fast", "chat-a-only", "embed"]),
        producer=rng.choice(["a", "b", None]),
        upstream_model=rng.choice(["sim-small", "sim-large", None]),
        endpoint="/v1/chat/completions",
        status=rng.choice([200, 200, 200, 429, 499, 502]),
        usage=Usage(
            input_tokens=rng.randrange(0, 10_000),
            output_tokens=out,
            reasoning_tokens=rng.randrange(0, out + 1),
            estimated=rng.random() < 0.2,
        ),
        # An int latency first: the PostgreSQL writer must still send a float array.
        latency_ms=rng.choice([12, 3.25, 100.5]),
        ttft_ms=rng.choice([None, 1.5, 7]),
        streamed=rng.random() < 0.5,
        error=rng.choice([None, "upstream said no"]),
        cost_nano=rng.randrange(0, 2**40),
        price_nano=rng.randrange(0, 2**40),
        service_tier=rng.choice([None, "flex"]),
        tags={"team": rng.choice(["x", "y"])} if rng.random() < 0.5 else {},
        queue_ms=rng.choice([0.0, 12.5, 3000.25]),
    )


def records(n: int, seed: int = 7) -> list[UsageRecord]:
    rng = random.Random(seed)
    return [record(i, rng) for i in range(n)]


@pytest.fixture
def store(database: str) -> Iterator[UsageStore]:
    s = open_usage_store(database)
    try:
        yield s
    finally:
        s.close()


def count_from_a_fresh_connection(url: str) -> int:
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as c:
            return c.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    conninfo, schema = split_schema(url)
    with psycopg.connect(conninfo) as c:
        return c.execute(f"SELECT COUNT(*) FROM {schema}.usage").fetchone()[0]  # type: ignore[index]


def test_the_url_picks_the_backend(tmp_path: Path) -> None:
    s = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    try:
        assert isinstance(s, SqliteUsageStore) and s.dialect == "sqlite"
    finally:
        s.close()
    with pytest.raises(ValueError, match="unsupported database URL mysql"):
        open_usage_store("mysql://x")


@both_stores
def test_flushed_rows_are_committed_and_visible_from_a_fresh_connection(
    store: UsageStore, database: str
) -> None:
    batch = records(5000)
    for r in batch:
        store.submit(r)
    assert store.flush(timeout_s=30)
    assert store.dropped == 0
    assert count_from_a_fresh_connection(database) == 5000
    # A retried write of the same request is ignored, not doubled.
    store.submit(batch[0])
    assert store.flush()
    assert count_from_a_fresh_connection(database) == 5000
    # And a fresh store reads back exactly what went in.
    again = open_usage_store(database)
    try:
        got = again.records()
    finally:
        again.close()
    assert sorted(got, key=lambda r: r.request_id) == batch


@both_stores
def test_a_row_the_store_refuses_is_dropped_alone_not_with_its_batch(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row with a value past its column (the ledger refused to attach it, so the relay sent
    it here) must not take the other requests' rows of its batch down with it."""
    monkeypatch.setattr(UsageStore, "_start", lambda self: None)  # queue first: one batch
    s = open_usage_store(database)
    monkeypatch.undo()
    try:
        batch = records(20)
        refused = {3, 4, 14}
        for i in refused:
            batch[i] = replace(batch[i], usage=replace(batch[i].usage, input_tokens=2**70))
        batch[4] = replace(batch[4], cost_nano=-(2**64))
        for r in batch:
            s.submit(r)
        s._start()
        s.flush(timeout_s=30)  # False only if the batch failed while it waited: not asserted
        assert s.dropped == len(refused)
        kept = [r for i, r in enumerate(batch) if i not in refused]
        assert sorted(s.records(), key=lambda r: r.request_id) == kept
        # The writer goes on: a later batch is written whole.
        later = [replace(r, request_id=f"later-{i}") for i, r in enumerate(kept)]
        for r in later:
            s.submit(r)
        assert s.flush(timeout_s=30) and s.dropped == len(refused)
        assert count_from_a_fresh_connection(database) == 2 * len(kept)
    finally:
        s.close()


@both_stores
def test_query_groups_filters_and_sums(store: UsageStore) -> None:
    batch = records(300)
    for r in batch:
        store.submit(r)
    assert store.flush()
    [total] = store.query()
    assert total.requests == 300
    assert total.sums["cost_nano"] == sum(r.cost_nano for r in batch)
    assert all(isinstance(v, int) for v in total.sums.values())
    by_key = {s.group["key"]: s for s in store.query(["key"])}
    assert by_key["key_a"].requests == sum(r.key_id == "key_a" for r in batch)
    since, until = T0_MS - DAY_MS, T0_MS + DAY_MS
    [window] = store.query(since_ms=since, until_ms=until, key_id="key_b")
    assert window.requests == sum(r.key_id == "key_b" and since <= r.ts_ms < until for r in batch)
    by_day = {s.group["day"]: s.requests for s in store.query(["day"])}
    expected: dict[str, int] = {}
    for r in batch:
        day = datetime.fromtimestamp(r.ts_ms // 1000, UTC).strftime("%Y-%m-%d")
        expected[day] = expected.get(day, 0) + 1
    assert by_day == expected and list(by_day) == sorted(expected)
    assert {"2024-03-30", "2024-03-31"} <= set(by_day)
    with pytest.raises(ValueError, match="unknown group_by"):
        store.query(["color"])


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_both_dialects_answer_every_query_the_same(database: str, tmp_path: Path) -> None:
    batch = records(2000, seed=11)
    lite = open_usage_store(f"sqlite:///{tmp_path / 'u.db'}")
    pg = open_usage_store(database)
    assert isinstance(pg, PostgresUsageStore)
    try:
        for s in (lite, pg):
            for r in batch:
                s.submit(r)
            assert s.flush(timeout_s=30)
        groupings = [[], *([g] for g in GROUPS), ["key", "day"], ["model", "producer", "status"]]
        for groups in groupings:
            for window in [(None, None, None), (T0_MS - DAY_MS, T0_MS + 1, "key_a")]:
                a = lite.query(groups, *window)
                b = pg.query(groups, *window)
                assert a == b, (groups, window)
        assert lite.records(limit=50) == pg.records(limit=50)
        assert lite.records(since_ms=T0_MS, until_ms=T0_MS + 3_600_000) == pg.records(
            since_ms=T0_MS, until_ms=T0_MS + 3_600_000
        )
    finally:
        lite.close()
        pg.close()


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_the_postgres_writer_reconnects_after_losing_its_connection(
    store: UsageStore, database: str
) -> None:
    assert isinstance(store, PostgresUsageStore)
    batch = records(20)
    for r in batch[:10]:
        store.submit(r)
    assert store.flush()
    pid = store._write_conn.info.backend_pid
    with psycopg.connect(PG_URL, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.1)
    for r in batch[10:]:
        store.submit(r)
    assert store.flush(timeout_s=30)
    assert store.dropped == 0
    assert count_from_a_fresh_connection(database) == 20


@both_stores
def test_keys_persist_revoke_transitively_and_reload(database: str) -> None:
    keys = KeyStore.open(database)
    try:
        root, root_secret = keys.create("root", ["chat-fast"], account_id="7")
        child, child_secret = keys.create("child", ["chat-fast"], parent_id=root.id)
        grandchild, _ = keys.create("grandchild", None, parent_id=child.id, metadata={"a": "b"})
        other, _ = keys.create("other", ttl_s=3600)
        assert keys.authenticate(root_secret) is root
        assert keys.authenticate("tw-nope") is None
        assert {k.id for k in keys.revoke(child.id)} == {child.id, grandchild.id}
        assert keys.authenticate(child_secret) is None
        assert keys.revoke(child.id) == []
    finally:
        keys.close()
    again = KeyStore.open(database)
    try:
        assert {k.id for k in again.list()} == {root.id, child.id, grandchild.id, other.id}
        assert {k.id for k in again.list(include_revoked=False)} == {root.id, other.id}
        assert again.authenticate(root_secret).public() == root.public()  # type: ignore[union-attr]
        assert again.authenticate(child_secret) is None
        assert again.get(grandchild.id).metadata == {"a": "b"}  # type: ignore[union-attr]
        assert again.get(grandchild.id).models is None  # type: ignore[union-attr]
        assert again.get(other.id).expires_ms is not None  # type: ignore[union-attr]
        # A start-up loads live keys only: the revoked child is in the table, not in memory.
        assert again.children(root.id) == []
        assert child.id not in again._by_id and again.get(child.id).revoked_ms  # type: ignore[union-attr]
        # Revoking the root reaches only what is still active.
        assert [k.id for k in again.revoke(root.id)] == [root.id]
        with pytest.raises(KeyError):
            again.revoke("key_missing")
    finally:
        again.close()


@both_stores
def test_iter_records_streams_every_row_in_pages(store: UsageStore) -> None:
    """Any number of rows, a page at a time (keyset: ties on ts_ms broken by request_id):
    `tokenworks reprice` covers them all, where a single capped read stopped at the cap."""
    rng = random.Random(5)
    recs = [record(i, rng, ts_ms=T0_MS + (i // 4)) for i in range(53)]  # four per millisecond
    rng.shuffle(recs)
    for r in recs:
        store.submit(r)
    assert store.flush()
    got = [r.request_id for r in store.iter_records(page_rows=7)]
    assert got == [r.request_id for r in sorted(recs, key=lambda r: (r.ts_ms, r.request_id))]
    window = list(store.iter_records(since_ms=T0_MS + 2, until_ms=T0_MS + 5, page_rows=4))
    assert len(window) == 12 and all(T0_MS + 2 <= r.ts_ms < T0_MS + 5 for r in window)
    assert len(list(store.iter_records(page_rows=53))) == 53  # an exact last page


@both_stores
def test_reads_do_not_wait_for_each_other(store: UsageStore) -> None:
    """A read holding a connection (a long summary) does not stop another: the store has a
    small pool of read connections, not one behind a lock."""
    import concurrent.futures

    rng = random.Random(3)
    for i in range(5):
        store.submit(record(i, rng))
    assert store.flush()
    readers = store._readers  # type: ignore[attr-defined]
    with readers.conn(), concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The first reader is taken, as by a read still running: another read goes ahead.
        other = pool.submit(store.query, ["model"])
        assert sum(s.requests for s in other.result(timeout=20)) == 5


def _execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One statement on the store's database, outside the store (as an older version would)."""
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as c:
            c.execute(sql, params)
            c.commit()
        return
    with contextlib.closing(pg_connect(url)) as c:
        c.execute(sql.replace("?", "%s"), params)


@both_stores
def test_a_usage_table_an_earlier_version_made_gains_the_new_columns(database: str) -> None:
    """`clamped_nano` came later: opening a store on an older table adds it (0 for the rows
    already there), and new rows keep it."""
    open_usage_store(database).close()
    _execute(database, "ALTER TABLE usage DROP COLUMN clamped_nano")  # the older table
    old, new = records(2)
    columns = [c for c in USAGE_COLUMNS if c != "clamped_nano"]
    _execute(
        database,
        f"INSERT INTO usage ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        usage_row(old)[: len(columns)],
    )
    store = open_usage_store(database)
    try:
        store.submit(replace(new, clamped_nano=7_000))
        assert store.flush()
        got = {r.request_id: r for r in store.records()}
        assert got[old.request_id] == old and old.clamped_nano == 0
        assert got[new.request_id].clamped_nano == 7_000
        [summary] = store.query()
        assert summary.sums["clamped_nano"] == 7_000
    finally:
        store.close()
    open_usage_store(database).close()  # and a second open finds nothing left to add


@both_stores
def test_a_usage_table_from_before_queue_ms_gains_the_column_on_open(database: str) -> None:
    """A database an earlier version created keeps its rows (queue_ms NULL: unknown) and
    takes new rows with their queue wait."""
    old_schema = tuple(c for c in USAGE_SCHEMA if c[0] != "queue_ms")
    old = Table("usage", ("request_id",), old_schema, upsert=False)
    columns = ", ".join(name for name, _ in old_schema)
    row = (
        "req-old", T0_MS, None, None, "chat", None, None, "chat", 200,
        1, 0, 0, 1, 0, 0, 1.0, None, 0, None, 0, 0, None, "{}", 0,
    )  # fmt: skip
    if database.startswith("sqlite://"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as c:
            for stmt in old.ddl("sqlite"):
                c.execute(stmt)
            c.execute(f"INSERT INTO usage ({columns}) VALUES ({','.join('?' * len(row))})", row)
    else:
        from tokenworks.db.postgres import connect

        with connect(database, old.ddl("postgres")) as c:
            c.execute(f"INSERT INTO usage ({columns}) VALUES ({','.join(['%s'] * len(row))})", row)
    for _ in range(2):  # the second open finds the column there already
        store = open_usage_store(database)
        try:
            fresh = replace(records(1)[0], request_id="req-new", queue_ms=41.5)
            store.submit(fresh)
            assert store.flush() and store.dropped == 0
            got = {r.request_id: r for r in store.records()}
        finally:
            store.close()
        assert got["req-old"].queue_ms is None
        assert got["req-new"].queue_ms == 41.5
