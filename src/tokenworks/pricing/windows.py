"""Daily time windows in a named time zone, with days of the week.

DeepSeek's peak hours are wall-clock hours in Beijing on weekdays; an operator's cheap night is
wall-clock hours where its customers sleep. Both are "HH:MM to HH:MM in zone Z on days D".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

from tokenworks.pricing.spec import DAY_NAMES, check_time, check_zone

ALL_DAYS = frozenset(range(7))
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) minutes after local midnight; end <= start wraps past midnight.

    `days` (0 = Monday) are the days a window *starts* on: a Friday 22:00-06:00 window covers
    Saturday 03:00. start == end means the whole day.
    """

    tz: tzinfo
    start_min: int
    end_min: int
    days: frozenset[int] = ALL_DAYS

    def __post_init__(self) -> None:
        assert 0 <= self.start_min < MINUTES_PER_DAY, self.start_min
        assert 0 <= self.end_min <= MINUTES_PER_DAY, self.end_min
        assert self.days and self.days <= ALL_DAYS, self.days

    @classmethod
    def parse(cls, start: str, end: str, tz: str = "UTC", days: list[str] | None = None) -> Window:
        start_min = check_time(start) % MINUTES_PER_DAY
        end_min = check_time(end)
        if end_min == MINUTES_PER_DAY and start_min == 0:
            end_min = 0
        day_set = frozenset(DAY_NAMES.index(d) for d in days) if days else ALL_DAYS
        return cls(check_zone(tz), start_min, end_min, day_set)

    def contains(self, at: datetime) -> bool:
        local = at.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        start, end = self.start_min, self.end_min
        if start == end % MINUTES_PER_DAY:
            return weekday in self.days
        if start < end:
            return start <= minute < end and weekday in self.days
        if minute >= start:
            return weekday in self.days
        return minute < end and (weekday - 1) % 7 in self.days

    def describe(self) -> str:
        days = (
            "daily" if self.days == ALL_DAYS else ",".join(DAY_NAMES[d] for d in sorted(self.days))
        )
        zone = self.tz.key if isinstance(self.tz, ZoneInfo) else str(self.tz)
        s, e = self.start_min, self.end_min
        return f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d} {zone} {days}"
