"""Producer health: a consecutive-failure circuit breaker per producer.

A producer that failed `FAILURES_TO_OPEN` times in a row is tried last for `COOLDOWN_S`,
so one that says "insufficient computing power" at peak hours stops costing every request a
wasted round trip. It is never removed outright: when every candidate is cooling down, the
request still goes to them in order.
"""

from __future__ import annotations

import time

FAILURES_TO_OPEN = 3
COOLDOWN_S = 10.0


class Health:
    def __init__(self) -> None:
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def ok(self, producer: str) -> None:
        if self._failures.get(producer):
            self._failures[producer] = 0
            self._open_until.pop(producer, None)

    def failed(self, producer: str, retry_after_s: float | None = None) -> None:
        count = self._failures.get(producer, 0) + 1
        self._failures[producer] = count
        if count >= FAILURES_TO_OPEN or retry_after_s:
            cooldown = min(max(retry_after_s or 0.0, COOLDOWN_S), 300.0)
            self._open_until[producer] = time.monotonic() + cooldown

    def healthy(self, producer: str, now: float | None = None) -> bool:
        until = self._open_until.get(producer)
        return until is None or (now if now is not None else time.monotonic()) >= until

    def snapshot(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        names = set(self._failures) | set(self._open_until)
        return {
            name: {
                "consecutive_failures": self._failures.get(name, 0),
                "healthy": self.healthy(name, now),
            }
            for name in sorted(names)
        }
