"""Scale with age (issue 13): what a year of history and many tenants cost, on SQLite or
PostgreSQL (`--pg`: a fresh schema per part, dropped after; the key part is SQLite only).

Generates large ledgers with the project's own engine and stores (the engine directly for
the admin writes, which is what `Ledger` does minus the await per write), then reports:

1. start-up and memory of the key store with many dead sub-agent keys beside a few live
   ones (live-only loading) against loading every row (what start-up did before);
2. the latency of paying ledger operations (hold + durable settle, the relay's ledger path)
   alone, and while a full-history usage summary, a statement and a ledger check run;
3. a 7-day statement of an account against its age (weeks of history), with the
   whole-history sum that statements used to take beside it;
4. a month boundary where every tenant's monthly grant renews at once: batches, the longest
   sweep turn on the event loop, holds served meanwhile, and the time to drain;
5. a ledger check of many tenants: its copy's slices and its cut on the event loop, its
   merge and comparison on a thread, the longest loop stall meanwhile, and what copying
   everything at once and checking on the loop (as before) took.

    .venv/bin/python bench/scale.py [--dead-keys 200000] [--usage-rows 300000]
        [--weeks 4,16,52] [--users 100000] [--gc-freeze]
        [--only keys,paying,statement,boundary,check] [--pg [URL]]

Every figure is one process on whatever cores it gets: compare figures of one run (ratios),
not across machines. Bounded in count and time: each part's sizes are its arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tokenworks.keys.store import KEY_COLUMNS, KeyStore, _from_row, open_key_rows
from tokenworks.ledger import Ledger, Period, Recurrence, auditor
from tokenworks.ledger.engine import SWEEP_TURN_ITEMS
from tokenworks.ledger.periods import from_ms
from tokenworks.ledger.rows import Batch
from tokenworks.ledger.slices import SlicedCopy
from tokenworks.metering.store import open_usage_store
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

    t_live, m_live, n_live = measure(live_only)
    t_all, m_all, n_all = measure(every_row)
    return {
        "keys": {"live": live, "dead": dead},
        "live_only": {"loaded": n_live, "startup_ms": _ms(t_live), "mib": m_live / 2**20},
        "every_row": {"loaded": n_all, "startup_ms": _ms(t_all), "mib": m_all / 2**20},
    }


# ---------------------------------------------------------------------- 2. paying ops


def _usage(i: int, ts_ms: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"u{i}", ts_ms=ts_ms, key_id=f"key_{i % 997}", account_id=str(i % 101),
        public_model="m", producer="p", upstream_model="m", endpoint="chat", status=200,
        usage=Usage(input_tokens=30, output_tokens=16), latency_ms=1.0, ttft_ms=None,
        streamed=False, error=None, cost_nano=100, price_nano=150, service_tier=None, tags={},
    )  # fmt: skip


async def bench_paying(db: Db, usage_rows: int, requests: int) -> dict[str, Any]:
    url = db.url("paying")
    usage = open_usage_store(db.url("usage"))
    start_ms = int(time.time() * 1000) - 365 * DAY_MS
    for i in range(usage_rows):  # a year of rows, spread evenly
        usage.submit(_usage(i, start_ms + i * (365 * DAY_MS // max(1, usage_rows))))
        if i % 50_000 == 0:
            usage.flush(60)
    usage.flush(60)
    L = await Ledger.open(url, sweep_interval_s=None)
    try:
        org = (await L.create_account("org", None, "organisation", idempotency_key="o")).id
        await L.top_up(org, 10**15, idempotency_key="t")
        for i in range(2_000):  # some history for the statement and the check to read
            await L.hold([org], 1_000, request_id=f"pre{i}")
            await L.settle(f"pre{i}", price_nano=500, cost_nano=100, producer="p", model="m",
                           durable=i % 100 == 99)  # fmt: skip
        await L.flush()
        counter = 0

        async def paying(n: int) -> list[float]:
            nonlocal counter
            out = []
            for _ in range(n):
                counter += 1
                rid = f"r{counter}"
                t0 = time.perf_counter()
                await L.hold([org], 1_000, request_id=rid)
                await L.settle(rid, price_nano=500, cost_nano=100, producer="p", model="m")
                out.append(time.perf_counter() - t0)
            return out

        async def workers(n: int) -> list[float]:
            parts = await asyncio.gather(*(paying(n // 8) for _ in range(8)))
            return [x for p in parts for x in p]

        alone = await workers(requests)
        reads_done: list[str] = []

        async def reads() -> None:
            since = datetime.now(UTC) - timedelta(days=400)
            until = datetime.now(UTC) + timedelta(days=1)
            t0 = time.perf_counter()
            await asyncio.to_thread(usage.query, ["key"])
            reads_done.append(f"usage summary {time.perf_counter() - t0:.2f} s")
            t0 = time.perf_counter()
            await L.statement(org, since, until)
            reads_done.append(f"statement {time.perf_counter() - t0:.3f} s")
            t0 = time.perf_counter()
            await L.check()
            reads_done.append(f"check {time.perf_counter() - t0:.2f} s")

        reader = asyncio.create_task(reads())
        under_reads = await workers(requests)
        await reader
        return {
            "usage_rows": usage_rows,
            "requests": requests,
            "alone": {"p50_ms": _ms(_p(alone, 0.5)), "p99_ms": _ms(_p(alone, 0.99))},
            "with_reads": {
                "p50_ms": _ms(_p(under_reads, 0.5)),
                "p99_ms": _ms(_p(under_reads, 0.99)),
            },
            "p99_ratio": round(_p(under_reads, 0.99) / _p(alone, 0.99), 2),
            "reads": reads_done,
        }
    finally:
        await L.close()
        usage.close()


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


async def bench_boundary(db: Db, users: int, freeze: bool) -> dict[str, Any]:
    clock_s = [datetime(2026, 3, 31, 23, tzinfo=UTC).timestamp()]
    L = await Ledger.open(db.url("boundary"), clock=lambda: clock_s[0],
                          sweep_interval_s=None)  # fmt: skip
    try:
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
        payer = e.create_account("payer", None, "organisation", draws_on_parent=False,
                                 idempotency_key="p", now_ms=now_ms)["id"]  # fmt: skip
        e.top_up(payer, 10**12, idempotency_key="pt", now_ms=now_ms)
        await L.flush()
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
        now_ms = L.now_ms()
        for i in range(users):  # a tenant with a monthly grant each, as at the boundary
            acc = e.create_account(f"u{i}", None, "organisation", draws_on_parent=False,
                                   idempotency_key=f"a{i}", now_ms=now_ms)  # fmt: skip
            e.grant(acc["id"], 1_000, recurring=Recurrence(Period.MONTH), rollover_cap_nano=0,
                    priority=0, expires_ms=None, effective_ms=None, idempotency_key=f"g{i}",
                    now_ms=now_ms)  # fmt: skip
            if i % 10_000 == 0:
                await L.flush()
        payer = e.create_account("payer", None, "organisation", draws_on_parent=False,
                                 idempotency_key="p", now_ms=now_ms)["id"]  # fmt: skip
        e.top_up(payer, 10**12, idempotency_key="pt", now_ms=now_ms)
        await L.flush()
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
    ap.add_argument("--requests", type=int, default=2_000)
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
        out["paying"] = asyncio.run(bench_paying(db, args.usage_rows, args.requests))
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
