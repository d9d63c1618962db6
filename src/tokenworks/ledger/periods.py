"""Calendar periods in a time zone: where a day, ISO week or month starts and ends.

Boundaries are computed on the local wall clock of `tz` and converted back to UTC
milliseconds, so a "monthly at Europe/Paris" grant refills at Paris midnight, DST included.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from tokenworks.ledger.domain import InvalidRequest, Period


@lru_cache(maxsize=64)
def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise InvalidRequest(f"unknown time zone {tz!r}") from exc


def to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise InvalidRequest("datetimes must be time-zone aware")
    return int(dt.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _local_midnight(year: int, month: int, day: int, tz: ZoneInfo) -> int:
    return to_ms(datetime(year, month, day, tzinfo=tz))


def period_start_ms(period: Period, tz: str, at_ms: int) -> int:
    """Start of the period that contains `at_ms` (0 for TOTAL)."""
    if period is Period.TOTAL:
        return 0
    z = zone(tz)
    local = datetime.fromtimestamp(at_ms / 1000, tz=z)
    if period is Period.DAY:
        return _local_midnight(local.year, local.month, local.day, z)
    if period is Period.WEEK:
        monday = local.date() - timedelta(days=local.weekday())
        return _local_midnight(monday.year, monday.month, monday.day, z)
    return _local_midnight(local.year, local.month, 1, z)


def period_end_ms(period: Period, tz: str, at_ms: int) -> int | None:
    """First instant after the period that contains `at_ms` (None for TOTAL)."""
    if period is Period.TOTAL:
        return None
    z = zone(tz)
    start = datetime.fromtimestamp(period_start_ms(period, tz, at_ms) / 1000, tz=z)
    if period is Period.DAY:
        nxt = start.date() + timedelta(days=1)
    elif period is Period.WEEK:
        nxt = start.date() + timedelta(days=7)
    else:
        nxt = (start.replace(day=28).date() + timedelta(days=4)).replace(day=1)
    end = _local_midnight(nxt.year, nxt.month, nxt.day, z)
    assert end > at_ms
    return end
