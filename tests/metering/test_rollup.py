"""Daily roll-ups and raw-row retention of the usage table, on SQLite and PostgreSQL.

The roll-up must answer every summary exactly as the raw rows do (hypothesis over random
rows, windows, groups and key filters), and keep answering it once the raw rows are gone.
"""

from __future__ import annotations

import random
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import both_stores
from tests.metering.test_stores import record
from tokenworks.metering.retention import UsageRetention
from tokenworks.metering.rollup import DAY_MS, GRACE_MS
from tokenworks.metering.store import GROUPS, UsageStore

pytestmark = both_stores

# 2024-03-30 00:00 UTC, a day boundary.
DAY0_MS = 1_711_756_800_000
LATER_MS = DAY0_MS + 40 * DAY_MS  # every day of the data is closed by then


def _clear(job: UsageRetention) -> None:
    with job._tx():
        for table in ("usage", "usage_daily", "usage_rollup"):
            job._exec(f"DELETE FROM {table}")


def _fill(store: UsageStore, n: int, seed: int, span_days: int = 6) -> None:
    rng = random.Random(seed)
    for i in range(n):
        ts = DAY0_MS + rng.randrange(0, span_days * DAY_MS)
        store.submit(record(i, rng, ts_ms=ts))
    assert store.flush()


def _answers(store: UsageStore, **window: object) -> tuple[list[object], list[object]]:
    rolled = store.query(**window)  # type: ignore[arg-type]
    raw = store.query(**window, use_rollup=False)  # type: ignore[arg-type]
    return rolled, raw


edges = st.one_of(
    st.none(),
    st.integers(0, 7).map(lambda d: DAY0_MS + d * DAY_MS),  # a day boundary
    st.integers(0, 7 * DAY_MS).map(lambda ms: DAY0_MS + ms),  # anywhere
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(0, 80),
    seed=st.integers(0, 2**16),
    groups=st.lists(st.sampled_from(sorted(GROUPS)), unique=True, max_size=3),
    since=edges,
    until=edges,
    key=st.sampled_from([None, "key_a"]),
    rolled_days=st.integers(0, 8),
)
def test_rollup_answers_as_the_raw_rows(
    stores: tuple[UsageStore, UsageRetention],
    n: int,
    seed: int,
    groups: list[str],
    since: int | None,
    until: int | None,
    key: str | None,
    rolled_days: int,
) -> None:
    store, job = stores
    _clear(job)
    _fill(store, n, seed)
    # Roll up some of the days (a watermark anywhere), then compare any window.
    job.roll_up(DAY0_MS + rolled_days * DAY_MS + GRACE_MS, max_days=40)
    rolled, raw = _answers(store, group_by=groups, since_ms=since, until_ms=until, key_id=key)
    assert rolled == raw


def test_the_rollup_is_read_and_outlives_the_raw_rows(
    stores: tuple[UsageStore, UsageRetention],
) -> None:
    store, job = stores
    _fill(store, 600, seed=3, span_days=10)
    windows = [
        {"group_by": ["day", "model", "key"]},
        {"group_by": ["account", "status"], "since_ms": DAY0_MS + DAY_MS},
        {"group_by": ["producer"], "since_ms": DAY0_MS, "until_ms": DAY0_MS + 4 * DAY_MS},
        {"group_by": [], "key_id": "key_b"},
    ]
    before = [store.query(**w, use_rollup=False) for w in windows]  # type: ignore[arg-type]
    assert job.roll_up(LATER_MS) == 10
    assert job.roll_up(LATER_MS) == 0  # nothing left to roll up: idempotent
    # Keep the last 3 days of raw rows: 7 days' rows go.
    deleted = job.expire(DAY0_MS + 7 * DAY_MS, batch_rows=50)
    assert deleted > 0
    remaining = store.query(use_rollup=False)[0].requests
    assert remaining + deleted == 600
    assert store.records(until_ms=DAY0_MS + 7 * DAY_MS) == []
    # Every whole-day answer is what the raw rows said before they were deleted.
    assert [store.query(**w) for w in windows] == before  # type: ignore[arg-type]


def test_deletion_is_bounded_and_waits_for_the_rollup(
    stores: tuple[UsageStore, UsageRetention],
) -> None:
    store, job = stores
    _fill(store, 300, seed=5, span_days=4)
    # Nothing is rolled up yet: nothing may be deleted.
    assert job.expire(DAY0_MS + 4 * DAY_MS) == 0
    job.roll_up(DAY0_MS + 2 * DAY_MS + GRACE_MS)  # days 0 and 1 only
    total = store.query(use_rollup=False)[0].requests
    # One batch of 10 rows per call at most.
    assert job.expire(DAY0_MS + 4 * DAY_MS, batch_rows=10, max_batches=1) == 10
    while job.expire(DAY0_MS + 4 * DAY_MS, batch_rows=10, max_batches=1):
        pass
    left = store.records(since_ms=None, until_ms=None)
    # Only the rolled-up days lost their rows.
    assert left and min(r.ts_ms for r in left) >= DAY0_MS + 2 * DAY_MS
    assert store.query()[0].requests == total


def test_a_late_row_is_rolled_up_before_its_day_goes(
    stores: tuple[UsageStore, UsageRetention],
) -> None:
    store, job = stores
    _fill(store, 50, seed=9, span_days=2)
    job.roll_up(LATER_MS)
    late = record(10_000, random.Random(1), ts_ms=DAY0_MS + 5)
    store.submit(late)
    assert store.flush()
    want = store.query(group_by=["day"], use_rollup=False)
    job.expire(LATER_MS)
    assert store.query(use_rollup=False)[0].requests == 0
    assert store.query(group_by=["day"]) == want


def test_deletion_runs_beside_the_writer_and_loses_nothing_new(
    stores: tuple[UsageStore, UsageRetention],
) -> None:
    store, job = stores
    _fill(store, 2_000, seed=8, span_days=5)
    job.roll_up(DAY0_MS + 5 * DAY_MS + GRACE_MS)
    want_old = store.query(group_by=["day", "model"], use_rollup=False)
    deleted: list[int] = []

    def expire() -> None:  # small batches, each its own transaction, beside the writer
        while n := job.expire(DAY0_MS + 5 * DAY_MS, batch_rows=20, max_batches=1):
            deleted.append(n)

    thread = threading.Thread(target=expire)
    thread.start()
    rng = random.Random(99)
    for i in range(500):  # new rows, of later days, written meanwhile
        store.submit(record(100_000 + i, rng, ts_ms=DAY0_MS + 6 * DAY_MS + i))
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert store.flush()
    assert sum(deleted) == 2_000 and len(deleted) >= 100
    assert store.query(since_ms=DAY0_MS + 6 * DAY_MS, use_rollup=False)[0].requests == 500
    assert store.query(group_by=["day", "model"], until_ms=DAY0_MS + 5 * DAY_MS) == want_old
