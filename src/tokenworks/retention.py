"""The retention job: roll up closed days, delete raw usage past its retention, compact old
holds, delete old ledger transfers (keeping their sums). One daemon thread per gateway,
every `retention.interval_s`, in bounded steps.

Off the hot path by construction: it runs on its own thread and its own connections, and
each of its transactions moves at most `retention.batch_rows` rows, so the ledger's and the
usage store's writers wait for one small batch at most (SQLite has one writer at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from tokenworks.config import Retention
from tokenworks.db import backend, sqlite_path
from tokenworks.ledger.compaction import HoldCompactor
from tokenworks.ledger.expiry import TransferExpiry
from tokenworks.metering.retention import UsageRetention

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
MAX_DAYS_PER_RUN = 31  # days rolled up per run: a year of backlog is caught up in 12 runs
MAX_BATCHES_PER_RUN = 100
BACKLOG_PAUSE_MIN_S = 1.0


@dataclass(slots=True)
class Report:
    days_rolled: int = 0
    usage_rows_deleted: int = 0
    holds_compacted: int = 0
    transfers_deleted: int = 0
    more: bool = False  # a step stopped at its bound: there is a backlog left


def run_once(policy: Retention, url: str, now_ms: int) -> Report:
    """One bounded pass over the database at `url`."""
    report = Report()
    usage = UsageRetention(url)
    try:
        report.days_rolled = usage.roll_up(now_ms, MAX_DAYS_PER_RUN)
        if policy.usage_rows_days is not None:
            report.usage_rows_deleted = usage.expire(
                now_ms - policy.usage_rows_days * DAY_MS, policy.batch_rows, MAX_BATCHES_PER_RUN
            )
    finally:
        usage.close()
    if policy.holds_days is not None:
        holds = HoldCompactor(url)
        try:
            report.holds_compacted = holds.compact(
                now_ms - policy.holds_days * DAY_MS, now_ms, policy.batch_rows, MAX_BATCHES_PER_RUN
            )
        finally:
            holds.close()
    # After the holds: the horizon never passes the oldest hold row still kept.
    transfers = TransferExpiry(url)
    try:
        transfers.ensure_partitions(now_ms)
        if policy.transfers_days is not None:
            report.transfers_deleted = transfers.expire(
                now_ms - policy.transfers_days * DAY_MS,
                now_ms,
                policy.batch_rows,
                MAX_BATCHES_PER_RUN,
            )
    finally:
        transfers.close()
    most_rows = policy.batch_rows * MAX_BATCHES_PER_RUN
    report.more = report.days_rolled >= MAX_DAYS_PER_RUN or any(
        n >= most_rows
        for n in (report.usage_rows_deleted, report.holds_compacted, report.transfers_deleted)
    )
    return report


def next_wait_s(report: Report, interval_s: float, took_s: float) -> float:
    """The pause before the next run: the interval; with a backlog left (a year of days to
    roll up after an upgrade), a pause as long as the run took, so that the backlog is gone
    within the hour yet the job never takes more than half the time."""
    if not report.more:
        return interval_s
    return min(interval_s, max(BACKLOG_PAUSE_MIN_S, took_s))


class RetentionJob:
    """The thread that calls `run_once` every `policy.interval_s` until stopped."""

    def __init__(self, policy: Retention, url: str) -> None:
        self.policy = policy
        self.url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self.last: Report | None = None

    @staticmethod
    def applies(url: str) -> bool:
        """An in-memory SQLite database has no second connection to work on."""
        return backend(url) != "sqlite" or sqlite_path(url) != ":memory:"

    def start(self) -> RetentionJob:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        wait_s = self.policy.interval_s
        while not self._stop.wait(wait_s):
            wait_s = self.policy.interval_s
            started = time.monotonic()
            try:
                self.last = run_once(self.policy, self.url, int(time.time() * 1000))
            except Exception:
                # The next run tries again; nothing is deleted that is not rolled up first.
                log.exception("retention: the run failed")
                continue
            wait_s = next_wait_s(self.last, self.policy.interval_s, time.monotonic() - started)


__all__ = ["Report", "RetentionJob", "next_wait_s", "run_once"]
