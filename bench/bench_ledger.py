"""Settled requests per second through the ledger alone (engine, SQLite, PostgreSQL).

Each request is hold -> settle on a 4-deep account chain with a key budget, the settle
awaiting its durable group commit, as the gateway does. Bounded in count and time:

    .venv/bin/python bench/bench_ledger.py [--requests 20000] [--concurrency 256]
        [--seconds 20] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid

from tokenworks.ledger import Engine, Ledger, Period


def bench_engine(n: int) -> float:
    eng = Engine()
    eng.bootstrap(0)
    ids: list[int] = []
    for i, kind in enumerate(("organisation", "team", "user", "agent")):
        acc = eng.create_account(
            kind, ids[-1] if ids else None, kind, idempotency_key=f"a{i}", now_ms=0
        )
        ids.append(acc["id"])
    eng.top_up(ids[0], 10**15, idempotency_key="top", now_ms=0)
    eng.set_budget("key:k", 10**14, Period.MONTH, idempotency_key="b", now_ms=0)
    t = time.perf_counter()
    for i in range(n):
        rid = f"r{i}"
        eng.hold(rid, ids, 5_000, key_scopes=["k"], ttl_ms=60_000, now_ms=1)
        eng.settle(rid, price_nano=3_000, cost_nano=1_000, producer="p", model="m", now_ms=1)
        if i % 4096 == 0:
            eng.take_batch()  # what the writer would do; keeps the journal small
    return n / (time.perf_counter() - t)


async def bench_store(url: str, n: int, concurrency: int, seconds: float) -> dict[str, float]:
    ledger = await Ledger.open(url, sweep_interval_s=None)
    try:
        ids: list[int] = []
        for i, kind in enumerate(("organisation", "team", "user", "agent")):
            acc = await ledger.create_account(
                kind, ids[-1] if ids else None, kind, idempotency_key=f"a{i}"
            )
            ids.append(acc.id)
        await ledger.top_up(ids[0], 10**15, idempotency_key="top")
        await ledger.set_budget(("key", "k"), 10**14, "month", idempotency_key="b")
        await ledger.set_budget(ids[1], 10**14, "day", idempotency_key="b2")
        done = 0
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        counter = iter(range(n))

        async def worker() -> None:
            nonlocal done
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                rid = f"r{i}"
                await ledger.hold(ids, 5_000, request_id=rid, key_scopes=["k"], ttl_s=60)
                await ledger.settle(rid, price_nano=3_000, cost_nano=1_000, producer="p", model="m")
                latencies.append(time.perf_counter() - t0)
                done += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t
        problems = await ledger.check()
        assert problems == [], problems[:5]
        latencies.sort()
        return {
            "settled": done,
            "per_s": done / elapsed,
            "batches": ledger.writer.batches,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        }
    finally:
        await ledger.close()


async def drop_schema(pg: str, schema: str) -> None:
    import asyncpg

    c = await asyncpg.connect(pg, timeout=5)
    try:
        await c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args()
    n = min(args.requests, 200_000)

    print(f"engine only (hold+settle, no store): {bench_engine(min(n, 50_000)):,.0f} req/s")
    with tempfile.TemporaryDirectory() as d:
        r = asyncio.run(bench_store(f"sqlite:///{d}/bench.db", n, args.concurrency, args.seconds))
        print(
            f"sqlite (synchronous=FULL): {r['per_s']:,.0f} settled req/s "
            f"({r['settled']} in {r['batches']} commits; p50 {r['p50_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms per hold+durable settle)"
        )
    schema = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    try:
        r = asyncio.run(
            bench_store(f"{args.pg}?schema={schema}", n, args.concurrency, args.seconds)
        )
        print(
            f"postgresql: {r['per_s']:,.0f} settled req/s "
            f"({r['settled']} in {r['batches']} commits; p50 {r['p50_ms']:.1f} ms, "
            f"p99 {r['p99_ms']:.1f} ms per hold+durable settle)"
        )
    except OSError as exc:
        print(f"postgresql: not reachable at {args.pg} ({exc}); skipped")
    finally:
        with contextlib.suppress(OSError):
            asyncio.run(drop_schema(args.pg, schema))


if __name__ == "__main__":
    main()
