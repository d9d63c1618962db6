"""Scale with age (issue 13): what a year of history and many tenants cost, on SQLite or
PostgreSQL (`--pg`: a fresh schema per part, dropped after; the key part is SQLite only).

Generates large ledgers with the project's own engine and stores (the engine directly for
the admin writes, which is what `Ledger` does minus the await per write), then reports:

1. start-up and memory of the key store with many dead sub-agent keys beside a few live
   ones (live-only loading) against loading every row (what start-up did before), under
   tracemalloc and as the RSS of a fresh process;
2. the latency of paying ledger operations (hold + durable settle, the relay's ledger path)
   alone, and while a full-history usage summary, a statement and a ledger check run, over
   a year of usage rows (100,000 accounts, two keys each, Zipf-distributed traffic): first
   reading the raw rows (the roll-up not yet run, as right after an upgrade), then the
   retention job's roll-up caught up (`retention.run_once`, timed), then the steady state
   that `tokenworks serve` keeps (whole days from `usage_daily`); on PostgreSQL also with
   `max_parallel_workers_per_gather = 0` on the usage store's read connections;
3. a 7-day statement of an account against its age (weeks of history), with the
   whole-history sum that statements used to take beside it;
4. a month boundary where every tenant's monthly grant renews at once: batches, the longest
   sweep turn on the event loop, holds served meanwhile, and the time to drain;
5. a ledger check of many tenants: its copy's slices and its cut on the event loop, its
   merge and comparison on a thread, the longest loop stall meanwhile, and what copying
   everything at once and checking on the loop (as before) took.

    .venv/bin/python bench/scale.py [--dead-keys 200000] [--usage-rows 300000]
        [--accounts 100000] [--requests 4000] [--rounds 2] [--weeks 4,16,52]
        [--users 100000] [--gc-freeze] [--only keys,paying,statement,boundary,check]
        [--pg [URL]] [--usage-url URL [--gen-only]] [--gen sql|store]
        [--summary pages|whole] [--page-keys 1000]

`--usage-url` keeps the usage rows between runs (generated there when the table is empty;
never dropped by the bench): generate 10M once with `--gen-only`, then measure on them.

Every figure is one process on whatever cores it gets: compare figures of one run (ratios),
not across machines. Bounded in count and time: each part's sizes are its arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tokenworks import retention
from tokenworks.config import Retention
from tokenworks.db.reads import ReadTimeout
from tokenworks.keys.store import KEY_COLUMNS, KeyStore, _from_row, open_key_rows
from tokenworks.ledger import Ledger, Period, Recurrence, auditor
from tokenworks.ledger.engine import SWEEP_TURN_ITEMS
from tokenworks.ledger.periods import from_ms
from tokenworks.ledger.rows import Batch
from tokenworks.ledger.slices import SlicedCopy
from tokenworks.metering import partitions
from tokenworks.metering.store import (
    READERS,
    USAGE_COLUMNS,
    UsageStore,
    open_usage_store,
    record_from_row,
    usage_row,
)
from tokenworks.metering.usage import Usage, UsageRecord

DAY_MS = 86_400_000
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


class Db:
    """Where each part's stores live: a file in `tmp`, or a fresh PostgreSQL schema (all of
    them dropped by `drop`)."""

    def __init__(self, tmp: Path, pg_url: str | None) -> None:
        self.tmp, self.pg_url = tmp, pg_url
        self.schemas: list[str] = []
        self.tag = f"scale_{random.getrandbits(32):08x}"

    def url(self, name: str) -> str:
        if self.pg_url is None:
            return f"sqlite:///{self.tmp}/{name}.db"
        self.schemas.append(f"{self.tag}_{name}")
        return f"{self.pg_url}?schema={self.schemas[-1]}"

    async def drop(self) -> None:
        if not self.schemas:
            return
        import asyncpg

        c = await asyncpg.connect(self.pg_url, timeout=10)
        try:
            for schema in self.schemas:
                await c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await c.close()


def _ms(s: float) -> float:
    return round(s * 1000, 2)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- 1. keys


def bench_keys(tmp: Path, dead: int, live: int) -> dict[str, Any]:
    url = f"sqlite:///{tmp}/keys.db"
    rows = open_key_rows(url)
    conn: Any = rows._conn  # type: ignore[attr-defined]
    marks = ", ".join("?" * len(KEY_COLUMNS))
    insert = f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks})"
    now_ms = int(time.time() * 1000)

    def row(i: int, alive: bool) -> tuple[Any, ...]:
        gone = (None, None) if alive else ((now_ms - 1, None) if i % 2 else (None, now_ms - 1))
        return (f"key_{i:012d}", f"agent-{i}", f"hash-{i}", "tw-abcd...wxyz", None, "1",
                None if alive else "key_000000000000", now_ms - 10**6 + i, *gone, "{}")  # fmt: skip

    conn.execute("BEGIN")
    conn.executemany(insert, (row(i, i < live) for i in range(live + dead)))
    conn.execute("COMMIT")
    rows.close()

    def measure(load: Any) -> tuple[float, int, int]:
        tracemalloc.start()
        t0 = time.perf_counter()
        n = load()
        took = time.perf_counter() - t0
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return took, size, n

    def live_only() -> int:
        store = KeyStore.open(url)
        n = len(store._by_id)
        measure.keep = store  # type: ignore[attr-defined]  # keep it alive while measured
        return n

    def every_row() -> int:  # what start-up did before: every row into memory
        r = open_key_rows(url)
        keys = [_from_row(x) for x in r._conn.execute("SELECT * FROM api_keys")]  # type: ignore[attr-defined]
        measure.keep = keys  # type: ignore[attr-defined]
        return len(keys)

    rss = {mode: _rss_of_start_up(url, mode) for mode in ("live_only", "every_row")}
    t_live, m_live, n_live = measure(live_only)
    t_all, m_all, n_all = measure(every_row)
    return {
        "keys": {"live": live, "dead": dead},
        "load": _load(),
        "live_only": {
            "loaded": n_live,
            "startup_ms": _ms(t_live),
            "mib": m_live / 2**20,
            **rss["live_only"],
        },
        "every_row": {
            "loaded": n_all,
            "startup_ms": _ms(t_all),
            "mib": m_all / 2**20,
            **rss["every_row"],
        },
    }


RSS_CHILD = """
import json, sys, time
from tokenworks.keys.store import KeyStore, _from_row, open_key_rows

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

url, mode = sys.argv[1], sys.argv[2]
before = rss_kib()
t0 = time.perf_counter()
if mode == "live_only":
    kept = KeyStore.open(url)
else:  # what start-up did before: every row into memory
    r = open_key_rows(url)
    kept = [_from_row(x) for x in r._conn.execute("SELECT * FROM api_keys")]
took = time.perf_counter() - t0
print(json.dumps({"rss_startup_ms": round(took * 1000, 1),
                  "rss_added_mib": round((rss_kib() - before) / 1024, 1),
                  "rss_total_mib": round(rss_kib() / 1024, 1)}))
"""


def _rss_of_start_up(url: str, mode: str) -> dict[str, float]:
    """Start-up time and resident memory of loading the keys in a fresh process (no
    tracemalloc): what a gateway's RSS grows by at start-up."""
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, url, mode], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout))


# ---------------------------------------------------------------------- 2. paying ops

MODELS = ("m-small", "m-large", "m-embed", "m-reason")
GEN_BATCH_ROWS = 20_000  # rows per `_write` transaction while generating


def _key_weights(keys: int, skew: float) -> list[float]:
    """Cumulative Zipf weights over key ranks: a few keys carry most of the traffic, most
    keys little (as tenants do), so a day rolls up to far fewer rows than it has requests."""
    total, out = 0.0, []
    for rank in range(1, keys + 1):
        total += rank**-skew
        out.append(total)
    return out


def _usage(
    i: int, ts_ms: int, key: int, keys_per_account: int, draws: tuple[float, ...]
) -> UsageRecord:
    """One request's record: each key belongs to one account and mostly uses one model (80 %
    of its requests; any of the others otherwise); 1 % of requests fail."""
    model_draw, status_draw, a, b = draws
    model = MODELS[key % 3] if model_draw < 0.8 else MODELS[int(model_draw * 20) % 4]
    status = 200 if status_draw < 0.99 else (429, 500)[int(status_draw * 1000) % 2]
    tokens_in, tokens_out = 10 + int(a * 3_990), 1 + int(b * 999)
    return UsageRecord(
        request_id=f"req_bench{i:012d}", ts_ms=ts_ms, key_id=f"key_{key:07d}",
        account_id=f"acc_{key // keys_per_account:06d}", public_model=model,
        producer=f"p-{model}", upstream_model=model, endpoint="chat", status=status,
        usage=Usage(input_tokens=tokens_in, output_tokens=tokens_out), latency_ms=1.0,
        ttft_ms=None, streamed=False, error=None, cost_nano=tokens_in * 3 + tokens_out * 15,
        price_nano=tokens_in * 4 + tokens_out * 20, service_tier=None, tags={},
    )  # fmt: skip


def _rows(first: int, chosen: list[int], start_ms: int, step_ms: int, keys_per_account: int,
          rng: random.Random) -> list[tuple[Any, ...]]:  # fmt: skip
    """`usage_row(_usage(...))` for a batch, built straight as tuples: the records and their
    JSON cost ~10x more than the database's write of them. `generate_usage` checks the two
    agree."""
    out = []
    rand = rng.random
    for i, key in enumerate(chosen, first):
        draws = (rand(), rand(), rand(), rand())
        model_draw, status_draw, a, b = draws
        model = MODELS[key % 3] if model_draw < 0.8 else MODELS[int(model_draw * 20) % 4]
        status = 200 if status_draw < 0.99 else (429, 500)[int(status_draw * 1000) % 2]
        tokens_in, tokens_out = 10 + int(a * 3_990), 1 + int(b * 999)
        out.append((
            f"req_bench{i:012d}", start_ms + i * step_ms, f"key_{key:07d}",
            f"acc_{key // keys_per_account:06d}", model, f"p-{model}", model, "chat", status,
            tokens_in, 0, 0, tokens_out, 0, 0, 1.0, None, 0, None,
            tokens_in * 3 + tokens_out * 15, tokens_in * 4 + tokens_out * 20, None, "{}", 0,
            0.0, draws,
        ))  # fmt: skip
    return out


GEN_SQL_CHUNK_ROWS = 250_000  # rows per INSERT ... SELECT (one transaction each)


def _gen_sql(dialect: str, keys: int) -> str:
    """One chunk of rows made by the database itself (parameters: first, end, start_ms,
    step_ms): the rows `_usage` describes, the key drawn from a Zipf law (s = 1.1) by inverting
    its continuous CDF."""
    lite = dialect == "sqlite"
    ph = "?" if lite else "%s"
    u = "(random() / 18446744073709551616.0 + 0.5)" if lite else "random()"

    def pad(e: str, w: int) -> str:
        return f"printf('%0{w}d', {e})" if lite else f"lpad(({e})::text, {w}, '0')"

    if lite:
        series = (f"(WITH RECURSIVE s(i) AS (SELECT {ph} UNION ALL SELECT i + 1 FROM s"
                  f" WHERE i + 1 < {ph}) SELECT i FROM s) AS s")  # fmt: skip
    else:
        series = f"generate_series({ph}, {ph} - 1) AS s(i)"
    least = "min" if lite else "least"
    zipf = f"CAST(floor(power(1 - {u} * (1 - power({keys}.0, -0.1)), -10)) AS BIGINT) - 1"
    models = " ".join(f"WHEN {n} THEN '{m}'" for n, m in enumerate(MODELS))
    model = (f"CASE CASE WHEN um < 0.8 THEN mod(k, 3) ELSE mod(CAST(floor(um * 20) AS INTEGER),"
             f" 4) END {models} END")  # fmt: skip
    status = ("CASE WHEN us < 0.99 THEN 200 WHEN mod(CAST(floor(us * 1000) AS INTEGER), 2) = 0"
              " THEN 429 ELSE 500 END")  # fmt: skip
    drawn = (f"SELECT i, {least}({zipf}, {keys - 1}) AS k, {u} AS um, {u} AS us, {u} AS ua,"
             f" {u} AS ub FROM {series}")  # fmt: skip
    shaped = (f"SELECT i, k, {model} AS m, {status} AS st, 10 + CAST(floor(ua * 3990) AS"
              " INTEGER) AS tin, 1 + CAST(floor(ub * 999) AS INTEGER) AS tout FROM d")  # fmt: skip
    ts = f"CAST({ph} AS BIGINT) + CAST(i AS BIGINT) * CAST({ph} AS BIGINT)"
    values = (f"'req_bench' || {pad('i', 12)}, {ts}, 'key_' || {pad('k', 7)},"
              f" 'acc_' || {pad('k / 2', 6)}, m, 'p-' || m, m, 'chat', st, tin, 0, 0, tout, 0,"
              " 0, 1.0, NULL, 0, NULL, tin * 3 + tout * 15, tin * 4 + tout * 20, NULL, '{}', 0,"
              " 0.0")  # fmt: skip
    columns = ", ".join(USAGE_COLUMNS)
    # MATERIALIZED: SQLite would otherwise flatten the subquery and draw random() again at
    # each reference to a column, giving a key's rows other accounts and models.
    return (f"WITH d AS MATERIALIZED ({drawn}) INSERT INTO usage ({columns})"
            f" SELECT {values} FROM ({shaped}) AS rows")  # fmt: skip


def generate_usage_sql(usage: UsageStore, rows: int, accounts: int, now_ms: int) -> dict[str, Any]:
    """The same year of rows as `generate_usage`, made by the database on the store's write
    connection, `GEN_SQL_CHUNK_ROWS` a transaction: no Python per row, for 10M rows on a
    machine where the store's own path (below) would take an hour."""
    start_ms = now_ms - 365 * DAY_MS
    conn: Any = usage._write_conn  # type: ignore[attr-defined]
    if usage.dialect == "postgres":
        partitions.ensure(conn, now_ms, start_ms)  # a partition per month, as `generate_usage`
    sql = _gen_sql(usage.dialect, accounts * 2)
    step_ms = 365 * DAY_MS // max(1, rows)
    t0 = time.perf_counter()
    for first in range(0, rows, GEN_SQL_CHUNK_ROWS):
        params = [first, min(rows, first + GEN_SQL_CHUNK_ROWS), start_ms, step_ms]
        if usage.dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")
        else:
            with conn.transaction():
                conn.execute(sql, params)
        if first % 1_000_000 == 0:
            took_s = time.perf_counter() - t0
            print(f"generated {first:,} rows, {took_s:.0f} s, load {_load()}", file=sys.stderr)
    took = time.perf_counter() - t0
    # Every row generated is a row the store could have written: it reads back as a record
    # whose row is itself, and is one draw: its account is its key's, its cost its tokens'.
    for row in usage._fetch("SELECT * FROM usage ORDER BY ts_ms LIMIT 100", [], None):  # type: ignore[attr-defined]
        assert usage_row(record_from_row(row)) == tuple(dict(row)[c] for c in USAGE_COLUMNS), row
        assert int(row["key_id"][4:]) // 2 == int(row["account_id"][4:]), row
        assert row["cost_nano"] == row["input_tokens"] * 3 + row["output_tokens"] * 15, row
    return {"rows": rows, "how": "INSERT ... SELECT on the store's write connection",
            "s": round(took, 1), "rows_per_s": round(rows / took)}  # fmt: skip


def generate_usage(usage: UsageStore, rows: int, accounts: int, now_ms: int) -> dict[str, Any]:
    """A year of usage rows, evenly spread, written through the store's own bulk write (one
    transaction per `GEN_BATCH_ROWS`), the next batch built while the last is written."""
    start_ms = now_ms - 365 * DAY_MS
    if usage.dialect == "postgres":
        # A year-old deployment has a partition per month (the writer makes each as it
        # comes); a fresh store has this month's and the next only.
        partitions.ensure(usage._write_conn, now_ms, start_ms)  # type: ignore[attr-defined]
    keys_per_account = 2
    cum = _key_weights(accounts * keys_per_account, 1.1)
    keys = range(accounts * keys_per_account)
    rng = random.Random(13)
    step_ms = 365 * DAY_MS // max(1, rows)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pending: Any = None
        for first in range(0, rows, GEN_BATCH_ROWS):
            n = min(GEN_BATCH_ROWS, rows - first)
            chosen = rng.choices(keys, cum_weights=cum, k=n)
            built = _rows(first, chosen, start_ms, step_ms, keys_per_account, rng)
            if first == 0:  # the fast rows are the records' rows
                row = built[0]
                record = _usage(0, row[1], chosen[0], keys_per_account, row[-1])
                assert usage_row(record) == row[:-1], (usage_row(record), row)
            batch = [row[:-1] for row in built]
            if pending is not None:
                pending.result()
            pending = pool.submit(usage._write, batch)  # type: ignore[attr-defined]
            if first % 1_000_000 == 0:
                took_s = time.perf_counter() - t0
                print(f"generated {first:,} rows, {took_s:.0f} s, load {_load()}", file=sys.stderr)
        if pending is not None:
            pending.result()
    took = time.perf_counter() - t0
    return {"rows": rows, "s": round(took, 1), "rows_per_s": round(rows / took)}


def usage_rows_in(usage: UsageStore) -> int:
    return int(usage._fetch("SELECT COUNT(*) AS n FROM usage", [], None)[0]["n"])  # type: ignore[attr-defined]


def usage_disk(usage: UsageStore) -> dict[str, Any]:
    """Bytes the raw rows and the roll-up take, indexes included (SQLite: `dbstat`;
    PostgreSQL: `pg_total_relation_size` of the table and its partitions)."""
    fetch: Any = usage._fetch  # type: ignore[attr-defined]
    if usage.dialect == "sqlite":
        sql = ("SELECT SUM(pgsize) AS b FROM dbstat WHERE name IN (SELECT name FROM sqlite_master"
               " WHERE tbl_name = ?)")  # fmt: skip
    else:
        sql = ("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) AS b FROM pg_class c"
               " WHERE c.oid = to_regclass(%s) OR c.oid IN (SELECT inhrelid FROM pg_inherits"
               " WHERE inhparent = to_regclass(%s))")  # fmt: skip

    def size(table: str) -> int:
        params = [table] if usage.dialect == "sqlite" else [table, table]
        return int(fetch(sql, params, None)[0]["b"] or 0)

    raw, daily = size("usage"), size("usage_daily")
    n = usage_rows_in(usage)
    d = int(fetch("SELECT COUNT(*) AS n FROM usage_daily", [], None)[0]["n"])
    return {"raw_mib": round(raw / 2**20), "raw_b_per_row": round(raw / max(1, n)),
            "daily_rows": d, "daily_mib": round(daily / 2**20, 1)}  # fmt: skip


def catch_up_rollup(url: str, now_ms: int) -> dict[str, Any]:
    """The retention job's runs until the roll-up has nothing left (what `tokenworks serve`
    does every `retention.interval_s`, `MAX_DAYS_PER_RUN` days a run)."""
    runs: list[float] = []
    days = 0
    for _ in range(100):
        t0 = time.perf_counter()
        rolled = retention.run_once(Retention(), url, now_ms).days_rolled
        runs.append(time.perf_counter() - t0)
        days += rolled
        if rolled < retention.MAX_DAYS_PER_RUN:
            break
    wall_min = len(runs) * Retention().interval_s / 60  # the runs are that far apart
    return {"days": days, "runs": len(runs), "work_s": round(sum(runs), 1),
            "longest_run_s": round(max(runs), 1),
            "wall_min_at_default_interval": round(wall_min)}  # fmt: skip


def _serial_reads(usage: UsageStore, workers: int) -> None:
    """Set `max_parallel_workers_per_gather` on every read connection of a PostgreSQL usage
    store (the pool's connections, all taken at once so each gets it)."""
    with contextlib.ExitStack() as stack:
        pool = usage._readers  # type: ignore[attr-defined]
        for conn in [stack.enter_context(pool.conn()) for _ in range(READERS)]:
            conn.execute(f"SET max_parallel_workers_per_gather = {int(workers)}")


async def bench_paying(db: Db, args: Any) -> dict[str, Any]:
    own_usage = args.usage_url is None
    usage_url = db.url("usage") if own_usage else args.usage_url
    usage = open_usage_store(usage_url)
    now_ms = int(time.time() * 1000)
    out: dict[str, Any] = {"usage_url": usage_url.split("?")[-1]}
    try:
        have = usage_rows_in(usage)
        if have == 0:
            gen = generate_usage if args.gen == "store" else generate_usage_sql
            out["generate"] = gen(usage, args.usage_rows, args.accounts, now_ms)
            if usage.dialect == "postgres":
                with psycopg_connect(usage_url) as c:
                    c.execute("VACUUM ANALYZE usage")  # what autovacuum does after a load
        out["usage_rows"] = usage_rows_in(usage)
        out["accounts"], out["load"] = args.accounts, _load()
        out["disk_before_rollup"] = usage_disk(usage)
        if args.gen_only:
            return out
        out.update(await _paying_cases(db, usage, usage_url, args, now_ms))
        out["disk_after_rollup"] = usage_disk(usage)
        return out
    finally:
        usage.close()


def psycopg_connect(url: str) -> Any:
    from tokenworks.db.postgres import connect

    return connect(url)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def _paying_cases(
    db: Db, usage: UsageStore, usage_url: str, args: Any, now_ms: int
) -> dict[str, Any]:
    L = await Ledger.open(db.url("paying"), sweep_interval_s=None)
    out: dict[str, Any] = {}
    try:
        org = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(org, 10**15, idempotency_key="t")
        for i in range(2_000):  # some history for the statement and the check to read
            await L.hold([org], 1_000, request_id=f"pre{i}")
            await L.settle(f"pre{i}", price_nano=500, cost_nano=100, producer="p", model="m",
                           durable=i % 100 == 99)  # fmt: skip
        await L.flush()
        counter = 0

        async def paying(n: int, during: asyncio.Task[None] | None = None) -> list[float]:
            """At least `n` paying operations, and on while `during` runs (bounded)."""
            nonlocal counter
            out: list[float] = []
            for i in range(100 * n):
                if i >= n and (during is None or during.done()):
                    break
                counter += 1
                rid = f"r{counter}"
                t0 = time.perf_counter()
                await L.hold([org], 1_000, request_id=rid)
                await L.settle(rid, price_nano=500, cost_nano=100, producer="p", model="m")
                out.append(time.perf_counter() - t0)
            return out

        async def workers(n: int, during: asyncio.Task[None] | None = None) -> list[float]:
            parts = await asyncio.gather(*(paying(n // 8, during) for _ in range(8)))
            return [x for p in parts for x in p]

        pages: dict[str, Any] = {}

        async def summary(use_rollup: bool) -> float | str:
            """The admin usage summary over all history, by key, under its read limit: whole
            (`--summary whole`, one statement, as before pages), or every page of it one
            after another (`--summary pages`, what `tokenworks usage` does now)."""
            t0 = time.perf_counter()
            try:
                if args.summary == "whole":
                    await asyncio.to_thread(usage.query, ["key"], use_rollup=use_rollup)
                else:
                    after, page_s = None, []
                    for _ in range(100_000):
                        p0 = time.perf_counter()
                        page = await asyncio.to_thread(
                            usage.query_page, ["key"], limit=args.page_keys, after=after,
                            use_rollup=use_rollup,
                        )  # fmt: skip
                        page_s.append(time.perf_counter() - p0)
                        if not page.has_more:
                            break
                        after = page.last
                    pages.update(
                        pages=len(page_s), first_page_ms=_ms(page_s[0]),
                        page_p50_ms=_ms(_p(page_s, 0.5)), page_max_ms=_ms(max(page_s)),
                    )  # fmt: skip
            except ReadTimeout:  # the admin API answers 503 query_timeout
                return f"read limit ({usage.read_timeout_s} s) passed"
            return round(time.perf_counter() - t0, 3)

        async def case(use_rollup: bool) -> dict[str, Any]:
            summary_alone = await summary(use_rollup)
            alone = await workers(args.requests)
            reads_done: dict[str, float | str] = {}

            async def reads() -> None:
                since = datetime.now(UTC) - timedelta(days=400)
                until = datetime.now(UTC) + timedelta(days=1)
                reads_done["usage_summary_s"] = await summary(use_rollup)
                t0 = time.perf_counter()
                await L.statement(org, since, until)
                reads_done["statement_s"] = round(time.perf_counter() - t0, 3)
                t0 = time.perf_counter()
                await L.check()
                reads_done["check_s"] = round(time.perf_counter() - t0, 3)

            load = _load()
            reader = asyncio.create_task(reads())
            under_reads = await workers(args.requests, reader)
            await reader
            return {
                "load": load,
                "summary_alone_s": summary_alone,
                "alone": {"p50_ms": _ms(_p(alone, 0.5)), "p99_ms": _ms(_p(alone, 0.99))},
                "with_reads": {
                    "p50_ms": _ms(_p(under_reads, 0.5)),
                    "p99_ms": _ms(_p(under_reads, 0.99)),
                },
                "p99_ratio": round(_p(under_reads, 0.99) / _p(alone, 0.99), 2),
                "ops": [len(alone), len(under_reads)],
                "reads": reads_done,
                "summary_pages": dict(pages),
            }

        # Right after an upgrade (no roll-up yet): the summary reads every raw row.
        out["raw_rows"] = [await case(False) for _ in range(0 if args.skip_raw else args.rounds)]
        print(json.dumps({"raw_rows": out["raw_rows"]}), file=sys.stderr)
        out["rollup_catch_up"] = await asyncio.to_thread(catch_up_rollup, usage_url, now_ms)
        print(json.dumps(out["rollup_catch_up"]), file=sys.stderr)
        # The steady state: the roll-up current, as the retention job keeps it.
        out["rolled_up"] = [await case(True) for _ in range(args.rounds)]
        print(json.dumps({"rolled_up": out["rolled_up"]}), file=sys.stderr)
        if usage.dialect == "postgres":
            _serial_reads(usage, 0)
            out["rolled_up_serial_reads"] = [await case(True) for _ in range(args.rounds)]
            raw_rounds = 0 if args.skip_raw else args.rounds
            out["raw_rows_serial_reads"] = [await case(False) for _ in range(raw_rounds)]
            print(json.dumps({k: out[k] for k in out if "serial" in k}), file=sys.stderr)
        return out
    finally:
        await L.close()


# ---------------------------------------------------------------------- 3. statements


OLD_NET_BEFORE = """
SELECT (SELECT XSUM(amount_nano) FROM ledger_transfers
        WHERE credit_account_id = :acc AND ts_ms < :until),
       (SELECT XSUM(amount_nano) FROM ledger_transfers
        WHERE debit_account_id = :acc AND ts_ms < :until)
"""


async def bench_statement(db: Db, weeks: int, per_week: int) -> dict[str, Any]:
    start = datetime(2025, 1, 6, tzinfo=UTC)
    clock_s = [start.timestamp()]
    L = await Ledger.open(db.url(f"st{weeks}"), clock=lambda: clock_s[0],
                          sweep_interval_s=None)  # fmt: skip
    try:
        e = L.engine
        org = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        step_s = 7 * 86_400 / per_week
        for i in range(weeks * per_week):  # top-ups and spend, evenly over the weeks
            now_ms = int(clock_s[0] * 1000)
            e.top_up(org, 1_000, idempotency_key=f"t{i}", now_ms=now_ms)
            h = e.hold(f"r{i}", [org], 800, ttl_ms=60_000, now_ms=now_ms)
            e.settle(h.id, price_nano=700, cost_nano=100, producer="p", model="m", now_ms=now_ms)
            clock_s[0] += step_s
            if i % 5_000 == 0:
                await L.flush()
        await L.flush()
        until = from_ms(int(clock_s[0] * 1000))
        since = until - timedelta(days=7)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            await L.statement(org, since, until)
            times.append(time.perf_counter() - t0)
        store: Any = L.store
        params = {"acc": org, "until": int(since.timestamp() * 1000)}
        t0 = time.perf_counter()
        for _ in range(5):
            if store.dialect == "sqlite":
                await store._run(store._all, OLD_NET_BEFORE, params)
            else:
                await store._all(OLD_NET_BEFORE, params)
        old = (time.perf_counter() - t0) / 5
        return {
            "weeks": weeks,
            "transfers": weeks * per_week * 3,
            "statement_7d_ms_median": _ms(statistics.median(times)),
            "whole_history_sum_ms": _ms(old),
        }
    finally:
        await L.close()


# ---------------------------------------------------------------------- 4. boundary


async def _tenants_on_monthly_grants(L: Ledger, users: int) -> int:
    """`users` accounts with a monthly grant each (the engine directly, as fast as it goes),
    and a funded payer account for the paying operations; returns the payer's id."""
    e = L.engine
    now_ms = L.now_ms()
    for i in range(users):
        acc = e.create_account(f"u{i}", None, "organisation", draws_on_parent=False,
                               idempotency_key=f"a{i}", now_ms=now_ms)  # fmt: skip
        e.grant(acc["id"], 1_000, recurring=Recurrence(Period.MONTH), rollover_cap_nano=0,
                priority=0, expires_ms=None, effective_ms=None, idempotency_key=f"g{i}",
                now_ms=now_ms)  # fmt: skip
        if i % 10_000 == 0:
            await L.flush()
    payer: int = e.create_account("payer", None, "organisation", draws_on_parent=False,
                                  idempotency_key="p", now_ms=now_ms)["id"]  # fmt: skip
    e.top_up(payer, 10**12, idempotency_key="pt", now_ms=now_ms)
    await L.flush()
    return payer


async def bench_boundary(db: Db, users: int, freeze: bool) -> dict[str, Any]:
    clock_s = [datetime(2026, 3, 31, 23, tzinfo=UTC).timestamp()]
    L = await Ledger.open(db.url("boundary"), clock=lambda: clock_s[0],
                          sweep_interval_s=None)  # fmt: skip
    try:
        e = L.engine
        payer = await _tenants_on_monthly_grants(L, users)
        if freeze:  # what a server could do after start-up: the loaded state leaves the GC
            gc.collect()
            gc.freeze()
        batches: list[int] = []
        write = L.store.write

        async def counting(batch: Batch, attached: Any = ()) -> None:
            batches.append(len(batch.transfers) + len(batch.holds) + len(batch.idempotency))
            await write(batch, attached)

        L.store.write = counting  # type: ignore[method-assign]
        turns: list[float] = []
        sweep = e.sweep

        def timed_sweep(now_ms: int, **kw: Any) -> dict[str, int]:
            t0 = time.perf_counter()
            try:
                return sweep(now_ms, **kw)
            finally:
                turns.append(time.perf_counter() - t0)

        e.sweep = timed_sweep  # type: ignore[method-assign]
        clock_s[0] = datetime(2026, 4, 1, tzinfo=UTC).timestamp() + 1
        held: list[float] = []

        async def holds() -> None:
            for i in range(100_000):
                if not e.grants_due(L.now_ms()):
                    return
                t0 = time.perf_counter()
                await L.hold([payer], 10, request_id=f"h{i}")
                await L.settle(f"h{i}", price_nano=5, cost_nano=1, producer="p", model="m")
                held.append(time.perf_counter() - t0)

        gc_pauses: list[float] = []
        gc_start = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_start[0] = time.perf_counter()
            else:
                gc_pauses.append(time.perf_counter() - gc_start[0])

        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        task = asyncio.create_task(L._sweep_due(L.now_ms))
        await holds()
        await task
        await L.flush()
        drained = time.perf_counter() - t0
        gc.callbacks.remove(on_gc)
        return {
            "users": users,
            "gc_freeze": freeze,
            "turn_items": SWEEP_TURN_ITEMS,
            "batches": len(batches),
            "max_batch_ops": max(batches),
            "sweep_turns": len(turns),
            "median_sweep_turn_ms": _ms(statistics.median(turns)),
            "p99_sweep_turn_ms": _ms(_p(turns, 0.99)),
            "max_sweep_turn_ms": _ms(max(turns)),
            "max_gc_pause_ms": _ms(max(gc_pauses, default=0.0)),
            "holds_served_meanwhile": len(held),
            "hold_settle_p99_ms": _ms(_p(held, 0.99)) if held else None,
            "drain_s": round(drained, 2),
        }
    finally:
        await L.close()


# ---------------------------------------------------------------------- 5. check


async def bench_check(db: Db, users: int) -> dict[str, Any]:
    L = await Ledger.open(db.url("check"), sweep_interval_s=None)
    try:
        e = L.engine
        payer = await _tenants_on_monthly_grants(L, users)
        gc.collect()
        gc.freeze()  # as `tokenworks serve` does after start-up
        spans: dict[str, float] = {}
        phases: list[tuple[str, float, float]] = []  # what ran when: where the longest stall fell

        def timed(name: str, fn: Any) -> Any:
            def run(*args: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    spans[name] = time.perf_counter() - t0
                    phases.append((name, t0, t0 + spans[name]))

            return run

        gc_pauses: list[tuple[float, float]] = []
        gc_start = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_start[0] = time.perf_counter()
            else:
                gc_pauses.append((gc_start[0], time.perf_counter()))
                phases.append((f"gc gen {info['generation']}", gc_start[0], gc_pauses[-1][1]))

        turns_ms: list[float] = []

        def timed_turn(fn: Any) -> Any:
            def run(*args: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    turns_ms.append(time.perf_counter() - t0)
                    phases.append(("a slice", t0, t0 + turns_ms[-1]))

            return run

        compare = auditor.cut_violations
        reads = SlicedCopy._read_accounts, SlicedCopy._read_buckets
        cut, assemble = SlicedCopy.cut, SlicedCopy.assemble
        SlicedCopy._read_accounts = timed_turn(reads[0])  # type: ignore[method-assign]
        SlicedCopy._read_buckets = timed_turn(reads[1])  # type: ignore[method-assign]
        SlicedCopy.cut = timed("cut_on_loop", cut)  # type: ignore[method-assign]
        SlicedCopy.assemble = timed("merge_on_thread", assemble)  # type: ignore[method-assign]
        auditor.cut_violations = timed("compare_on_thread", compare)  # type: ignore[assignment]
        gaps: list[float] = []
        held: list[float] = []
        done = asyncio.Event()

        worst = [0.0, 0.0]  # the longest gap's start and end

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                if now - last > worst[1] - worst[0]:
                    worst[:] = [last, now]
                last = now

        async def paying() -> None:
            for i in range(100_000):
                if done.is_set():
                    return
                t0 = time.perf_counter()
                await L.hold([payer], 10, request_id=f"c{i}")
                await L.settle(f"c{i}", price_nano=5, cost_nano=1, producer="p", model="m",
                               durable=True)  # fmt: skip
                held.append(time.perf_counter() - t0)

        real_snapshot = L.store.snapshot

        async def timed_snapshot() -> Any:
            snap = await real_snapshot()
            real_audit = snap.audit

            async def audit() -> Any:
                t0 = time.perf_counter()
                try:
                    return await real_audit()
                finally:
                    phases.append(("store audit", t0, time.perf_counter()))

            snap.audit = audit
            return snap

        L.store.snapshot = timed_snapshot  # type: ignore[method-assign]
        tasks = [asyncio.create_task(ticker()), asyncio.create_task(paying())]
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        try:
            violations = await L.check()
        finally:
            took = time.perf_counter() - t0
            done.set()
            await asyncio.gather(*tasks)
            gc.callbacks.remove(on_gc)
            auditor.cut_violations = compare  # type: ignore[assignment]
            SlicedCopy._read_accounts, SlicedCopy._read_buckets = reads  # type: ignore[method-assign]
            SlicedCopy.cut, SlicedCopy.assemble = cut, assemble  # type: ignore[method-assign]
        copy = L.last_copy
        assert copy is not None
        t1 = time.perf_counter()
        e.facts(L.now_ms())  # the whole copy at once (what the cut took before slices)
        whole_copy = time.perf_counter() - t1
        t1 = time.perf_counter()
        e.check(L.now_ms())  # what the check held the loop for before: copy and check together
        on_loop = time.perf_counter() - t1
        return {
            "users": users,
            "violations": len(violations),
            "check_s": round(took, 2),
            "slice_objects": copy.slice_objects,
            "slice_turns": copy.turns,
            "max_slice_turn_ms": _ms(max(turns_ms, default=0.0)),
            "median_slice_turn_ms": _ms(statistics.median(turns_ms)) if turns_ms else None,
            "recopied_at_cut": copy.recopied,
            "whole_copy_at_cut": copy.whole,
            "cut_on_loop_ms": _ms(spans["cut_on_loop"]),
            "merge_on_thread_ms": _ms(spans["merge_on_thread"]),
            "compare_on_thread_ms": _ms(spans["compare_on_thread"]),
            "whole_copy_on_loop_ms_before": _ms(whole_copy),
            "max_loop_gap_ms": _ms(max(gaps, default=0.0)),
            "max_gap_overlaps": sorted({n for n, a, b in phases if a < worst[1] and b > worst[0]}),
            "max_gc_pause_ms": _ms(max((b - a for a, b in gc_pauses), default=0.0)),
            "paying_served_meanwhile": len(held),
            "paying_p99_ms": _ms(_p(held, 0.99)) if held else None,
            "whole_check_on_loop_ms_before": _ms(on_loop),
        }
    finally:
        await L.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dead-keys", type=int, default=200_000)
    ap.add_argument("--live-keys", type=int, default=1_000)
    ap.add_argument("--usage-rows", type=int, default=300_000)
    ap.add_argument("--accounts", type=int, default=100_000, help="accounts the usage is over")
    ap.add_argument(
        "--usage-url",
        default=None,
        help="measure this usage store (kept after; generated first if empty)",
    )
    ap.add_argument("--gen-only", action="store_true", help="only generate the usage rows")
    ap.add_argument("--gen", choices=("sql", "store"), default="sql",
                    help="rows made by the database or by the store's bulk write")  # fmt: skip
    ap.add_argument("--skip-raw", action="store_true", help="measure the rolled-up case only")
    ap.add_argument("--rounds", type=int, default=2, help="paying comparisons per case")
    ap.add_argument(
        "--summary",
        choices=["pages", "whole"],
        default="pages",
        help="the usage summary as the API's pages (default) or one statement",
    )
    ap.add_argument("--page-keys", type=int, default=200, help="keys per summary page")
    ap.add_argument("--requests", type=int, default=4_000)
    ap.add_argument("--weeks", default="4,16,52")
    ap.add_argument("--per-week", type=int, default=300)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start-up")
    ap.add_argument("--only", default="keys,paying,statement,boundary,check")
    ap.add_argument("--pg", nargs="?", const=PG_URL, default=None,
                    help=f"on PostgreSQL (default {PG_URL}), a fresh schema per part")  # fmt: skip
    args = ap.parse_args()
    parts = set(args.only.split(","))
    out: dict[str, Any] = {}
    random.seed(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = Db(tmp, args.pg)
        try:
            run_parts(out, parts, args, tmp, db)
        finally:
            asyncio.run(db.drop())
    print(json.dumps(out, indent=2))
    return 0


def run_parts(out: dict[str, Any], parts: set[str], args: Any, tmp: Path, db: Db) -> None:
    if "keys" in parts and db.pg_url is None:
        out["keys"] = bench_keys(tmp, args.dead_keys, args.live_keys)
        print(json.dumps(out["keys"]), file=sys.stderr)
    if "paying" in parts:
        out["paying"] = asyncio.run(bench_paying(db, args))
        print(json.dumps(out["paying"]), file=sys.stderr)
    if "statement" in parts:
        out["statement"] = [
            asyncio.run(bench_statement(db, int(w), args.per_week)) for w in args.weeks.split(",")
        ]
        print(json.dumps(out["statement"]), file=sys.stderr)
    if "boundary" in parts:
        out["boundary"] = asyncio.run(bench_boundary(db, args.users, args.gc_freeze))
        print(json.dumps(out["boundary"]), file=sys.stderr)
    if "check" in parts:
        out["check"] = asyncio.run(bench_check(db, args.users))


if __name__ == "__main__":
    raise SystemExit(main())
