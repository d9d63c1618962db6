"""`tokenworks export`: a closed month's tables to Parquet, read back with pyarrow and
compared with the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import both_stores
from tests.metering.test_stores import record
from tokenworks.cli.export import ExportError, export_month, month_range_ms
from tokenworks.cli.main import main
from tokenworks.ledger import Ledger
from tokenworks.metering.retention import UsageRetention
from tokenworks.metering.store import open_usage_store

OCT_MS = 1_790_812_800_000  # 2026-10-01 00:00 UTC
NOV_MS = 1_793_491_200_000  # 2026-11-01 00:00 UTC
DAY_MS = 86_400_000


def _fill(database: str) -> None:
    store = open_usage_store(database)
    rng = random.Random(2)
    try:
        # 700 rows in October, and some either side that must stay out.
        for i in range(700):
            store.submit(record(i, rng, ts_ms=OCT_MS + rng.randrange(NOV_MS - OCT_MS)))
        for i in range(700, 760):
            store.submit(record(i, rng, ts_ms=rng.choice([OCT_MS - 1, NOV_MS, NOV_MS + DAY_MS])))
        assert store.flush()
    finally:
        store.close()
    job = UsageRetention(database)
    try:
        job.roll_up(NOV_MS + 5 * DAY_MS, max_days=60)
    finally:
        job.close()

    async def ledger() -> None:
        t = [(OCT_MS + 3 * DAY_MS) / 1000]
        L = await Ledger.open(database, clock=lambda: t[0], sweep_interval_s=None)
        try:
            org = await L.create_account("o", None, "organisation", idempotency_key="o")
            await L.top_up(org.id, 10**9, idempotency_key="top")
            for i in range(40):
                await L.hold([org.id], 1_000, request_id=f"r{i}")
                await L.settle(f"r{i}", price_nano=10 * i, cost_nano=i, producer="p", model="m")
                t[0] += 3600
        finally:
            await L.close()

    asyncio.run(ledger())


@both_stores
def test_a_month_exports_table_by_table(database: str, tmp_path: Path) -> None:
    _fill(database)
    out = tmp_path / "wh"
    written = export_month(database, "2026-10", out, batch_rows=64, now_ms=NOV_MS + DAY_MS)
    assert set(written) == {
        "usage-2026-10.parquet",
        "usage_daily-2026-10.parquet",
        "ledger_transfers-2026-10.parquet",
        "ledger_holds-2026-10.parquet",
        "ledger_holds_compacted-2026-10.parquet",
    }
    store = open_usage_store(database)
    try:
        (want,) = store.query(since_ms=OCT_MS, until_ms=NOV_MS, use_rollup=False)
        by_day = store.query(group_by=["day"], since_ms=OCT_MS, until_ms=NOV_MS)
    finally:
        store.close()
    usage = pq.read_table(out / "usage-2026-10.parquet")
    assert usage.num_rows == want.requests == 700
    for column, total in want.sums.items():
        assert pc.sum(usage[column]).as_py() == total, column
    # Written a batch at a time: one row group per batch, never the month at once.
    assert pq.ParquetFile(out / "usage-2026-10.parquet").metadata.num_row_groups == 11
    assert usage.schema.field("latency_ms").type == "double"
    daily = pq.read_table(out / "usage_daily-2026-10.parquet")
    assert pc.sum(daily["requests"]).as_py() == 700
    assert pc.sum(daily["price_nano"]).as_py() == want.sums["price_nano"]
    assert len(set(daily["day"].to_pylist())) == len(by_day)
    holds = pq.read_table(out / "ledger_holds-2026-10.parquet")
    assert holds.num_rows == 40
    assert pc.sum(holds["price_nano"]).as_py() == sum(10 * i for i in range(40))
    transfers = pq.read_table(out / "ledger_transfers-2026-10.parquet")
    spend = transfers.filter(pc.equal(transfers["kind"], "spend"))
    assert pc.sum(spend["amount_nano"]).as_py() == sum(10 * i for i in range(40))
    assert pq.read_table(out / "ledger_holds_compacted-2026-10.parquet").num_rows == 0


def test_only_closed_months(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not over yet"):
        month_range_ms("2026-11", NOV_MS + DAY_MS)
    with pytest.raises(ExportError, match="YYYY-MM"):
        month_range_ms("2026-13", NOV_MS)
    assert month_range_ms("2026-12", 2**62)[1] - month_range_ms("2026-12", 2**62)[0] == 31 * DAY_MS


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    _fill(url)
    with pytest.raises(SystemExit) as done:
        main(["export", "--month", "2026-10", "--out", str(tmp_path / "o"), "--database", url])
    assert done.value.code == 0
    assert "usage-2026-10.parquet\t700 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["export", "--month", "2999-01", "--out", str(tmp_path / "o"), "--database", url])
    assert done.value.code == 2
    assert "not over yet" in capsys.readouterr().err
