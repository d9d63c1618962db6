"""The retention policy: its config section, and one pass of the job over both stores."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from tests.conftest import both_stores
from tests.metering.test_stores import record
from tokenworks.config import ConfigError, Retention, loads
from tokenworks.ledger import Ledger
from tokenworks.metering.store import open_usage_store
from tokenworks.retention import (
    BACKLOG_PAUSE_MIN_S,
    Report,
    RetentionJob,
    next_wait_s,
    run_once,
)

DAY_MS = 86_400_000
NOW_MS = 1_790_000_000_000  # 2026-09-21


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "retention:\n  holds_days: 10\n",
            r"^r\.yaml:2: retention\.holds_days: Expected `int` >= 35",
        ),
        (
            "retention:\n  usage_rows_days: 0\n",
            r"^r\.yaml:2: retention\.usage_rows_days: Expected `int` >= 1",
        ),
        (
            "\nretention:\n  batch_rows: 10\n",
            r"^r\.yaml:3: retention\.batch_rows: Expected `int` >= 100",
        ),
        (
            "retention:\n  interval_s: .nan\n",
            r"^r\.yaml:2: retention\.interval_s: must be a finite number",
        ),
        ("retention:\n  keep: 3\n", r"^r\.yaml:2: retention\.keep: unknown field"),
        (
            "retention:\n  transfers_days: 7\n  holds_days: 35\n",
            r"^r\.yaml:2: retention\.transfers_days: Expected `int` >= 35",
        ),
        (
            "retention:\n  holds_days: 90\n  transfers_days: 60\n",
            r"^r\.yaml:3: retention\.transfers_days: must be >= retention\.holds_days \(now 90\)",
        ),
        (
            "retention:\n  interval_s: 60\n  transfers_days: 400\n",
            r"^r\.yaml:3: retention\.transfers_days: must be >= retention\.holds_days \(now unset\)",
        ),
    ],
)
def test_a_bad_policy_names_file_line_and_field(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        loads(text, "r.yaml", check_prices=False)


def test_the_default_keeps_everything() -> None:
    policy = loads("", check_prices=False).retention
    assert (policy.usage_rows_days, policy.holds_days, policy.transfers_days) == (None,) * 3
    ok = "retention:\n  holds_days: 90\n  transfers_days: 90\n"
    assert loads(ok, check_prices=False).retention.transfers_days == 90
    assert loads("retention:\n  usage_rows_days: 30\n", check_prices=False).retention == Retention(
        usage_rows_days=30
    )


@both_stores
def test_one_pass_rolls_up_deletes_and_compacts(database: str) -> None:
    store = open_usage_store(database)
    rng = random.Random(5)
    try:
        for i in range(300):  # 60 days of rows
            store.submit(record(i, rng, ts_ms=NOW_MS - 60 * DAY_MS + i * 5 * 3_600_000))
        assert store.flush()
        want = store.query(group_by=["day", "key"], since_ms=NOW_MS - 61 * DAY_MS - NOW_MS % DAY_MS)
    finally:
        store.close()

    async def one_settled_hold() -> None:
        L = await Ledger.open(
            database, clock=lambda: (NOW_MS - 50 * DAY_MS) / 1000, sweep_interval_s=None
        )
        try:
            org = await L.create_account("o", None, "organisation", idempotency_key="o")
            await L.top_up(org.id, 10**6, idempotency_key="t")
            await L.hold([org.id], 500, request_id="r1")
            await L.settle("r1", price_nano=200, cost_nano=50, producer="p", model="m")
        finally:
            await L.close()

    asyncio.run(one_settled_hold())
    policy = Retention(usage_rows_days=30, holds_days=40, batch_rows=100)
    first = run_once(policy, database, NOW_MS)
    # A run is bounded: 31 days of backlog rolled up, and only those may lose rows.
    assert first.days_rolled == 31 and first.more  # a backlog: the next run comes soon
    assert first.holds_compacted == 1
    assert first.usage_rows_deleted > 0
    second = run_once(policy, database, NOW_MS)
    assert second.days_rolled >= 28 and not second.more
    store = open_usage_store(database)
    try:
        assert store.records(until_ms=NOW_MS - 31 * DAY_MS) == []
        assert (
            store.query(group_by=["day", "key"], since_ms=NOW_MS - 61 * DAY_MS - NOW_MS % DAY_MS)
            == want
        )
    finally:
        store.close()

    async def check() -> list[str]:
        L = await Ledger.open(database, sweep_interval_s=None)
        try:
            return await L.check()
        finally:
            await L.close()

    assert asyncio.run(check()) == []
    again = run_once(policy, database, NOW_MS)  # nothing left to do
    assert (again.days_rolled, again.usage_rows_deleted, again.holds_compacted) == (0, 0, 0)
    assert not again.more


def test_a_backlog_shortens_the_pause_to_the_runs_own_length() -> None:
    assert next_wait_s(Report(), 300, took_s=50) == 300
    assert next_wait_s(Report(more=True), 300, took_s=50) == 50
    assert next_wait_s(Report(more=True), 300, took_s=0.01) == BACKLOG_PAUSE_MIN_S
    assert next_wait_s(Report(more=True), 30, took_s=50) == 30


def test_the_job_runs_on_its_thread_until_stopped(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    open_usage_store(url).close()
    job = RetentionJob(Retention(interval_s=1), url).start()
    try:
        for _ in range(50):
            if job.last is not None:
                break
            time.sleep(0.1)
        assert job.last is not None
    finally:
        job.stop()
    assert not job._thread.is_alive()
    assert not RetentionJob.applies("sqlite://:memory:")


def test_the_gateway_runs_the_job_and_stops_it(make_gateway: Any, sims: tuple[Any, Any]) -> None:
    models = """
        models:
          - name: chat-fast
            deployments: [{producer: a, model: sim-small}]
        """
    extra = "retention:\n  usage_rows_days: 30\n  interval_s: 1\n"
    with make_gateway({"a": sims[0].url}, models, extra) as gw:
        job = gw.app.state.gateway.retention
        assert isinstance(job, RetentionJob) and job._thread.is_alive()
        assert job.policy.usage_rows_days == 30
        for _ in range(50):  # its first run, on its own thread
            if job.last is not None:
                break
            time.sleep(0.1)
        assert job.last is not None
    assert not job._thread.is_alive()
