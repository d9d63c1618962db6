"""Disk per request before and after roll-ups and retention, on SQLite and PostgreSQL.

Requests go through the project's own ledger (hold, settle, the usage row attached to the
settlement's commit, as the gateway does) on a clock spread over `--days` days that end
at a fixed instant, then the retention job runs (`usage_rows_days`, `holds_days`, and
`transfers_days` if given) until it has nothing left to do; then `--more-days` more days
of traffic and retention again, whose growth is the steady state's disk per request
(deleted rows' space is reused, not returned).
Reports bytes per table and per request (SQLite: pages in use and the file; PostgreSQL:
pg_total_relation_size after VACUUM). Bounded in count: (`--days` + `--more-days`) x
`--per-day` requests.

    .venv/bin/python bench/disk.py [--days 90] [--more-days 30] [--per-day 2000] [--usage-days 7]
        [--holds-days 35] [--transfers-days 35] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from tokenworks.config import Retention
from tokenworks.db import split_schema
from tokenworks.ledger import Ledger
from tokenworks.metering import partitions
from tokenworks.metering.store import USAGE_SCHEMA, open_usage_store, usage_row
from tokenworks.metering.usage import Usage, UsageRecord
from tokenworks.retention import run_once

DAY_MS = 86_400_000
END_MS = 1_790_812_800_000  # 2026-10-01 00:00 UTC: "now" when the retention job runs
TABLES = (
    "usage",
    "usage_daily",
    "ledger_holds",
    "ledger_holds_compacted",
    "ledger_transfers",
    # What transfer retention keeps of the transfers it deletes (empty without it).
    "ledger_account_periods",
    "ledger_bucket_bases",
    "ledger_transfers_dropped",
)


async def generate(url: str, days: int, per_day: int, end_ms: int, seed: int = 1) -> int:
    """days x per_day settled requests with their usage rows, ending at `end_ms`."""
    rng = random.Random(seed)
    t = [(end_ms - days * DAY_MS) / 1000]
    ledger = await Ledger.open(url, clock=lambda: t[0], sweep_interval_s=None)
    n = 0
    try:
        org = await ledger.create_account("org", None, "organisation", idempotency_key="org")
        await ledger.top_up(org.id, 10**17, idempotency_key="top")
        users = [
            (await ledger.create_account(f"u{i}", org.id, "user", idempotency_key=f"u{i}")).id
            for i in range(20)
        ]
        keys = [f"key_{i:03d}" for i in range(60)]
        models = [("chat-fast", "sim-small"), ("chat-big", "sim-large"), ("embed", "emb-1")]
        for day in range(days):
            day_start_s = t[0] = (end_ms - (days - day) * DAY_MS) / 1000
            for i in range(per_day):
                t[0] = day_start_s + i * 86_400 / per_day
                rid = f"req-{end_ms}-{day:04d}-{i:06d}"
                k = rng.randrange(len(keys))
                key, user = keys[k], users[k % len(users)]  # a key belongs to one account
                model, upstream = rng.choice(models)
                inp, out = rng.randrange(50, 8_000), rng.randrange(1, 1_500)
                price = inp * 150 + out * 600
                await ledger.hold([org.id, user], price * 2, request_id=rid, key_scopes=[key])
                await ledger.settle(
                    rid, price_nano=price, cost_nano=price // 2, producer="sim",
                    model=model, durable=False,
                )  # fmt: skip
                record = UsageRecord(
                    request_id=rid, ts_ms=int(t[0] * 1000), key_id=key, account_id=str(user),
                    public_model=model, producer="sim", upstream_model=upstream,
                    endpoint="/v1/chat/completions", status=200,
                    usage=Usage(input_tokens=inp, output_tokens=out),
                    latency_ms=rng.uniform(50, 3000), ttft_ms=rng.uniform(5, 300),
                    streamed=rng.random() < 0.6, error=None, cost_nano=price // 2,
                    price_nano=price, service_tier=None, tags={},
                )  # fmt: skip
                assert ledger.attach("usage", USAGE_SCHEMA, usage_row(record))
                n += 1
            await ledger.flush()
    finally:
        await ledger.close()
    return n


async def open_ledger(url: str) -> None:
    ledger = await Ledger.open(url, sweep_interval_s=None)
    await ledger.close()


def sqlite_sizes(path: str) -> tuple[dict[str, int], int]:
    """(bytes in use per table, indexes included; the file's bytes)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = conn.execute(
            "SELECT COALESCE(m.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d"
            " LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY 1"
        ).fetchall()
    finally:
        conn.close()
    return {name: int(size) for name, size in rows}, Path(path).stat().st_size


def pg_sizes(url: str) -> dict[str, int]:
    conninfo, schema = split_schema(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"SET search_path = {schema}")
        for table in TABLES:
            conn.execute(f"VACUUM ANALYZE {table}")
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,),
        ).fetchall()
    sizes: dict[str, int] = {}
    for name, size in rows:
        table = name
        for parent in ("usage", "ledger_transfers"):
            if name.startswith(f"{parent}_p") or name == f"{parent}_default":
                table = parent
        sizes[table] = sizes.get(table, 0) + int(size)
    return sizes


def retain(args: argparse.Namespace, url: str, now_ms: int) -> tuple[int, int, int, int]:
    policy = Retention(
        usage_rows_days=args.usage_days,
        holds_days=args.holds_days,
        transfers_days=args.transfers_days,
        batch_rows=5_000,
    )
    totals = [0, 0, 0, 0]
    for _ in range(20):  # each run is bounded; a backlog takes a few
        r = run_once(policy, url, now_ms)
        done = (r.days_rolled, r.usage_rows_deleted, r.holds_compacted, r.transfers_deleted)
        totals = [a + b for a, b in zip(totals, done, strict=True)]
        if not any(done):
            break
    return totals[0], totals[1], totals[2], totals[3]


def show(label: str, sizes: dict[str, int], requests: int) -> None:
    total = sum(sizes.get(t, 0) for t in TABLES)
    everything = sum(sizes.values())
    parts = ", ".join(f"{t} {sizes.get(t, 0) / 1e6:.2f} MB" for t in TABLES)
    print(
        f"  {label}: {everything / 1e6:.2f} MB in all, {everything / requests:.0f} B/request"
        f" ({total / requests:.0f} B/request in the history tables: {parts})"
    )


def run_sqlite(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/disk.db"
        url = f"sqlite:///{path}"
        open_usage_store(url).close()
        t0 = time.perf_counter()
        n = asyncio.run(generate(url, args.days, args.per_day, END_MS))
        print(f"SQLite: {n} requests over {args.days} days in {time.perf_counter() - t0:.0f} s")
        before, file_before = sqlite_sizes(path)
        show("before", before, n)
        t0 = time.perf_counter()
        rolled, deleted, compacted, transfers = retain(args, url, END_MS)
        print(
            f"  retention: {rolled} days rolled up, {deleted} usage rows deleted,"
            f" {compacted} holds compacted, {transfers} transfers deleted"
            f" in {time.perf_counter() - t0:.1f} s"
        )
        after, file_after = sqlite_sizes(path)
        show("after (pages in use)", after, n)
        print(
            f"  file: {file_before / 1e6:.2f} MB before, {file_after / 1e6:.2f} MB after"
            " (freed pages are reused by later writes, not returned to the file system)"
        )
        # Steady state: more days of traffic, retention again; the file grows by what stays.
        end2 = END_MS + args.more_days * DAY_MS
        n2 = asyncio.run(generate(url, args.more_days, args.per_day, end2, seed=2))
        retain(args, url, end2)
        steady, file_steady = sqlite_sizes(path)
        show(f"after {args.more_days} more days and retention (pages in use)", steady, n + n2)
        grew = sum(steady.values()) - sum(after.values())
        print(
            f"  steady state: pages in use grew {grew / 1e6:.2f} MB for {n2} requests,"
            f" {grew / n2:.0f} B/request (before retention: {sum(before.values()) / n:.0f});"
            f" the file grew {(file_steady - file_after) / 1e6:.2f} MB (freed pages reused)"
        )
        conn = sqlite3.connect(path)
        conn.execute("VACUUM")
        conn.close()
        _, file_vacuumed = sqlite_sizes(path)
        print(f"  file after VACUUM: {file_vacuumed / 1e6:.2f} MB")


def run_pg(args: argparse.Namespace) -> None:
    schema = f"bench_disk_{uuid.uuid4().hex[:8]}"
    url = f"{args.pg}?schema={schema}"
    end2 = END_MS + args.more_days * DAY_MS
    try:
        store = open_usage_store(url)
        # The months of the data get their partitions, as the writer would have made them.
        partitions.ensure(store._write_conn, end2, END_MS - args.days * DAY_MS)  # type: ignore[attr-defined]
        asyncio.run(open_ledger(url))  # its tables, then its transfers' months alike
        partitions.ensure(
            store._write_conn,  # type: ignore[attr-defined]
            end2,
            END_MS - args.days * DAY_MS,
            "ledger_transfers",
        )
        store.close()
        t0 = time.perf_counter()
        n = asyncio.run(generate(url, args.days, args.per_day, END_MS))
        print(f"PostgreSQL: {n} requests over {args.days} days in {time.perf_counter() - t0:.0f} s")
        before = pg_sizes(url)
        show("before", before, n)
        t0 = time.perf_counter()
        rolled, deleted, compacted, transfers = retain(args, url, END_MS)
        print(
            f"  retention: {rolled} days rolled up, {deleted} partitions dropped or rows"
            f" deleted, {compacted} holds compacted, {transfers} transfers deleted"
            f" in {time.perf_counter() - t0:.1f} s"
        )
        after = pg_sizes(url)
        show("after (VACUUM: deleted rows' space is reused, not returned)", after, n)
        n2 = asyncio.run(generate(url, args.more_days, args.per_day, end2, seed=2))
        retain(args, url, end2)
        steady = pg_sizes(url)
        show(f"after {args.more_days} more days and retention", steady, n + n2)
        grew = sum(steady.values()) - sum(after.values())
        print(
            f"  steady state: the tables grew {grew / 1e6:.2f} MB for {n2} requests,"
            f" {grew / n2:.0f} B/request (before retention: {sum(before.values()) / n:.0f}"
            " B/request)"
        )
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--per-day", type=int, default=2_000)
    parser.add_argument("--more-days", type=int, default=30, help="then, for the steady state")
    parser.add_argument("--usage-days", type=int, default=7)
    parser.add_argument("--holds-days", type=int, default=35)
    parser.add_argument("--transfers-days", type=int, default=None)
    parser.add_argument("--pg", default=None, help="a PostgreSQL URL: measure it too")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    print(
        f"disk per request: {args.days} days x {args.per_day} requests, retention"
        f" usage_rows_days={args.usage_days} holds_days={args.holds_days}"
        f" transfers_days={args.transfers_days}"
    )
    if not args.no_sqlite:
        run_sqlite(args)
    if args.pg:
        run_pg(args)


if __name__ == "__main__":
    main()
