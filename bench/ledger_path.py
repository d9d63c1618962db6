"""CPU per request of the gateway's ledger path alone, without HTTP: steadier than req/s.

What the relay does for a paying key, and nothing else: a hold on a one-account chain with
the key's scope, then a durable settlement, the balance header's figure, and the usage row
attached to the settlement's commit. `--concurrency` tasks run it at once, as requests in
flight do. CPU time is read per thread from /proc (the event loop's thread, and the others:
SQLite's writer thread), divided by the requests settled. Bounded in count and time.

    .venv/bin/python bench/ledger_path.py [--requests 30000] [--concurrency 64]
        [--pg [URL]] [--rounds 3]

On a shared machine CPU per request moves less than throughput does, so compare figures of
one run (say, before and after a change, run back to back), not across days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid

import ledger_cpu
import run
import uvloop

from tokenworks.ledger import Ledger
from tokenworks.metering.store import USAGE_SCHEMA, open_usage_store, usage_row
from tokenworks.metering.usage import Usage, UsageRecord

MAX_REQUESTS = 500_000


def record(request_id: str, account: int) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        ts_ms=int(time.time() * 1000),
        key_id="bench-key",
        account_id=str(account),
        public_model="bench",
        producer="sim",
        upstream_model="bench",
        endpoint="chat",
        status=200,
        usage=Usage(input_tokens=30, output_tokens=16),
        latency_ms=1.0,
        ttft_ms=None,
        streamed=False,
        cost_nano=21_700,
        price_nano=21_700,
    )


async def measure(url: str, n: int, concurrency: int, seconds: float) -> dict[str, float]:
    open_usage_store(url).close()  # the usage table, as the gateway creates it
    ledger = await Ledger.open(url, sweep_interval_s=None)
    try:
        tag = uuid.uuid4().hex[:8]
        acc = await ledger.create_account("bench", None, "organisation", idempotency_key=tag)
        await ledger.top_up(acc.id, 10**18, idempotency_key=f"{tag}-top")
        counter = iter(range(n))
        deadline = time.monotonic() + seconds
        done = 0

        async def one_request(i: int) -> None:
            rid = f"{tag}-{i}"
            await ledger.hold([acc.id], 5_000_000, request_id=rid, key_scopes=["bench-key"])
            await asyncio.sleep(0)  # the upstream call
            await ledger.settle(
                rid, price_nano=21_700, cost_nano=21_700, producer="sim", model="bench"
            )
            ledger.engine.chain_available(acc.id)
            ledger.attach("usage", USAGE_SCHEMA, usage_row(record(rid, acc.id)))

        async def worker() -> None:
            nonlocal done
            for i in counter:
                if time.monotonic() > deadline:
                    return
                await one_request(i)
                done += 1

        for i in range(200):  # warm up: statements prepared, caches filled
            await one_request(n + i)
        await ledger.flush()
        pid = os.getpid()
        main0, other0 = ledger_cpu.cpu_by_thread(pid)
        pg0 = ledger_cpu.postgres_cpu_s()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await ledger.flush()
        elapsed = time.perf_counter() - t0
        main1, other1 = ledger_cpu.cpu_by_thread(pid)
        pg_s = ledger_cpu.postgres_cpu_s() - pg0
        problems = await ledger.check()
        assert problems == [], problems[:5]
        return {
            "requests": done,
            "per_s": done / elapsed,
            "commits": ledger.writer.batches,
            "loop_us": (main1 - main0) / done * 1e6,
            "other_us": (other1 - other0) / done * 1e6,
            "postgres_us": pg_s / done * 1e6,
        }
    finally:
        await ledger.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", nargs="?", const=run.DEFAULT_PG)
    args = parser.parse_args()
    n = min(args.requests, MAX_REQUESTS)
    targets = ["sqlite"] + (["postgres"] if args.pg else [])
    results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    print("round store      req/s  commits  loop us  other us  postgres us  total us")
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            for target in targets:
                schema = f"tw_path_{uuid.uuid4().hex[:10]}"
                if target == "sqlite":
                    url = f"sqlite:///{tmp}/ledger-{round_no}.db"
                else:
                    url = run.pg_database(args.pg, schema)
                try:
                    r = uvloop.run(measure(url, n, args.concurrency, args.seconds))
                finally:
                    if target == "postgres":
                        with contextlib.suppress(OSError):
                            run.drop_pg_schema(args.pg, schema)
                results[target].append(r)
                total = r["loop_us"] + r["other_us"] + r["postgres_us"]
                print(
                    f"{round_no + 1:>5} {target:<9} {r['per_s']:7.0f} {r['commits']:8.0f} "
                    f"{r['loop_us']:8.1f} {r['other_us']:9.1f} {r['postgres_us']:12.1f} "
                    f"{total:9.1f}",
                    flush=True,
                )
    print("\nmedians over rounds (us per request)")
    for target, rs in results.items():
        loop = statistics.median(r["loop_us"] for r in rs)
        other = statistics.median(r["other_us"] for r in rs)
        pg = statistics.median(r["postgres_us"] for r in rs)
        print(f"{target:<9} loop {loop:6.1f}  other threads {other:6.1f}  postgres {pg:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
