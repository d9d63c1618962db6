"""Capacity primitives on an injected clock: windows, an adaptive limit, a circuit breaker.

Everything here is pure and synchronous: every method takes `now` (seconds on whatever clock
the caller injects) and nothing sleeps, so the same code runs in the gateway and in the
virtual-clock simulation of tests/test_scheduler.py.

- `SlidingWindow`: at most `limit` units admitted in any window of `window_s` seconds, exactly.
  An admission is an entry that can be corrected later (reserve an estimate, settle the
  actual). Used for a producer's rpm/tpm and for consumers' rate limits (ratelimit.py).
- `AdaptiveLimit`: AIMD concurrency limit. Cut multiplicatively once per congestion event
  (429/529/overload/timeout), grown additively (about +1 per `limit` successes) while in use.
- `CircuitBreaker`: closed -> open on consecutive failures or an error rate over the last
  outcomes, open -> half-open after a back-off that doubles per re-open, half-open lets a few
  probes through; a probe's success closes it, its failure re-opens it.
- `PoolCapacity`: a producer's configured max_concurrency, rpm and tpm, the adaptive limit and
  the upstream's Retry-After pause, as one "may I start a request of N tokens now?" check.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """How an upstream attempt ended, as the relay classifies it."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"  # 429: this credential's quota; pause and cut, the host is fine
    OVERLOADED = "overloaded"  # 529/503 "insufficient capacity": cut, and counts as a failure
    TIMEOUT = "timeout"  # cut, and counts as a failure
    ERROR = "error"  # 5xx, connect error, broken body: a failure, not a capacity signal
    CANCELLED = "cancelled"  # the client went away: says nothing about the producer


_CUTS = frozenset({Outcome.RATE_LIMITED, Outcome.OVERLOADED, Outcome.TIMEOUT})
_FAILURES = frozenset({Outcome.OVERLOADED, Outcome.TIMEOUT, Outcome.ERROR})
FAILURES = _FAILURES  # what a breaker counts against a deployment
NO_VERDICT = frozenset({Outcome.CANCELLED, Outcome.RATE_LIMITED})  # says nothing of its health
_OK = Outcome.OK


class WindowEntry:
    """One admission in a window; `correct` it when the actual amount is known."""

    __slots__ = ("amount", "at", "live")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount
        self.live = True


class SlidingWindow:
    """At most `limit` units in any half-open window `(t - window_s, t]`, whatever the order.

    Exact for the admissions it makes: an amount is admitted only if the units already in the
    window plus it stay within the limit, so every window ending at an admission holds at most
    the limit, and windows ending between admissions hold a subset of one of those. Corrections
    downward (the estimate was an upper bound) keep that; a correction upward is recorded too
    (the units were used) and can overshoot by the understatement, which then blocks further
    admissions until it leaves the window. An entry that has already left the window when its
    correction comes is not reopened; extra units are recorded at `now` instead.

    Memory is one entry per admission still in the window.
    """

    __slots__ = ("_entries", "_used", "limit", "window_s")

    def __init__(self, limit: float, window_s: float = 60.0) -> None:
        if limit <= 0 or window_s <= 0:
            raise ValueError("a window needs a positive limit and length")
        self.limit = limit
        self.window_s = window_s
        self._entries: deque[WindowEntry] = deque()
        self._used = 0.0

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.window_s
        while entries and entries[0].at <= horizon:
            entry = entries.popleft()
            entry.live = False
            self._used -= entry.amount
        if not entries:
            self._used = 0.0  # no float residue once the window is empty

    def used(self, now: float) -> float:
        self._expire(now)
        return self._used

    def remaining(self, now: float) -> float:
        return max(0.0, self.limit - self.used(now))

    def fits(self, amount: float, now: float) -> bool:
        return self.used(now) + amount <= self.limit

    def take(self, amount: float, now: float) -> WindowEntry:
        """Record an admission unconditionally (the caller checked `fits`)."""
        entry = WindowEntry(now, amount)
        self._entries.append(entry)
        self._used += amount
        return entry

    def try_take(self, amount: float, now: float) -> WindowEntry | None:
        return self.take(amount, now) if self.fits(amount, now) else None

    def correct(self, entry: WindowEntry, amount: float, now: float) -> None:
        """Set an admission's final amount (reserve-the-estimate, settle-the-actual)."""
        if entry.live:
            self._used += amount - entry.amount
            entry.amount = amount
            return
        if amount > entry.amount:
            self.take(amount - entry.amount, now)

    def wait_s(self, amount: float, now: float) -> float | None:
        """Seconds until `amount` would fit, 0 if it fits now, None if it never can."""
        if amount > self.limit:
            return None
        excess = self.used(now) + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0.0
        for entry in self._entries:
            freed += entry.amount
            if freed >= excess:
                return self._until_gone(entry, now)
        return self._until_gone(self._entries[-1], now) if self._entries else 0.0

    def _until_gone(self, entry: WindowEntry, now: float) -> float:
        # The smallest wait after which `now + wait` really is past the entry's window, in
        # floating point too: a retry at exactly the advertised time must fit.
        wait = entry.at + self.window_s - now
        while (now + wait) - self.window_s < entry.at:
            wait = math.nextafter(wait, math.inf)
        return wait

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*)."""
        self._expire(now)
        return self._until_gone(self._entries[-1], now) if self._entries else 0.0


class AdaptiveLimit:
    """AIMD concurrency limit for a producer whose real capacity is unknown or moving.

    - a capacity signal (429, 529/overload, timeout) multiplies the limit by `backoff`, once
      per congestion event: failures of requests started before the last cut are the same
      event and do not cut again (TCP's rule), so 30 requests failing together cut once;
    - a success grows it by `1/limit` (about +1 per `limit` successes) while at least half of
      the limit is in use, so an idle producer's limit does not drift up unobserved;
    - it stays within [min_limit, max_limit].
    """

    __slots__ = ("_last_cut_at", "backoff", "cuts", "limit", "max_limit", "min_limit")

    def __init__(
        self,
        initial: float,
        *,
        min_limit: float = 1.0,
        max_limit: float = 1024.0,
        backoff: float = 0.5,
    ) -> None:
        if not 0 < backoff < 1 or min_limit < 1 or max_limit < min_limit:
            raise ValueError("AIMD needs 0 < backoff < 1 and 1 <= min_limit <= max_limit")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.backoff = backoff
        self.limit = min(max(initial, min_limit), max_limit)
        self._last_cut_at = -math.inf
        self.cuts = 0

    @property
    def value(self) -> int:
        return int(self.limit)

    def on_success(self, inflight: int) -> None:
        if inflight * 2 >= self.limit:
            self.limit = min(self.max_limit, self.limit + 1.0 / self.limit)

    def on_congestion(self, started_at: float, now: float) -> bool:
        """Cut for a capacity signal; False when it belongs to an event already cut for."""
        if started_at <= self._last_cut_at:
            return False
        self.limit = max(self.min_limit, self.limit * self.backoff)
        self._last_cut_at = now
        self.cuts += 1
        return True


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Members as module constants: an enum attribute lookup costs ~15x a global's in the
# hot path.
_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


class CircuitBreaker:
    """Per deployment: stop sending to one that fails, probe it back.

    Opens when `consecutive_failures` attempts failed in a row, or when at least
    `min_volume` of the last `window` outcomes are known and `error_rate` of them failed.
    Stays open `open_s`, doubled per consecutive re-open up to `max_open_s` (or longer if the
    upstream's Retry-After said so), then lets `probes` attempts through (half-open); one
    success closes it and forgets the history, one failure re-opens it.
    """

    __slots__ = (
        "_outcomes",
        "_probes_out",
        "consecutive",
        "consecutive_failures",
        "error_rate",
        "failures_in_window",
        "max_open_s",
        "min_volume",
        "open_s",
        "open_until",
        "opens",
        "probes",
        "reopens",
        "state_",
        "window",
    )

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        error_rate: float = 0.5,
        window: int = 20,
        min_volume: int = 10,
        open_s: float = 10.0,
        max_open_s: float = 300.0,
        probes: int = 1,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.error_rate = error_rate
        self.window = window
        self.min_volume = min_volume
        self.open_s = open_s
        self.max_open_s = max_open_s
        self.probes = probes
        self.state_ = _CLOSED
        self.open_until = 0.0
        self.consecutive = 0
        self.failures_in_window = 0
        self.opens = 0  # times opened, for metrics
        self.reopens = 0  # consecutive re-opens without a close, for the back-off
        self._outcomes: deque[bool] = deque()
        self._probes_out = 0

    def state(self, now: float) -> BreakerState:
        if self.state_ is _OPEN and now >= self.open_until:
            self.state_ = _HALF_OPEN
            self._probes_out = 0
        return self.state_

    def try_acquire(self, now: float) -> bool:
        """May an attempt go to this deployment now? Half-open, this takes a probe slot."""
        state = self.state(now)
        if state is _CLOSED:
            return True
        if state is _HALF_OPEN and self._probes_out < self.probes:
            self._probes_out += 1
            return True
        return False

    def release(self) -> None:
        """A probe ended without a verdict (the client went away): free its slot."""
        if self.state_ is _HALF_OPEN and self._probes_out:
            self._probes_out -= 1

    def record(self, ok: bool, now: float, retry_after_s: float | None = None) -> None:
        state = self.state_
        if state is _CLOSED and ok and not self.failures_in_window:
            # The common case, short: a success while nothing failed lately.
            outcomes = self._outcomes
            outcomes.append(True)
            if len(outcomes) > self.window:
                outcomes.popleft()
            return
        if state is _OPEN:
            state = self.state(now)
        if state is _HALF_OPEN:
            if ok:
                self._close()
            else:
                self._open(now, retry_after_s)
            return
        if state is _OPEN:
            return  # an attempt started before it opened; its verdict is already in
        self._outcomes.append(ok)
        if not ok:
            self.failures_in_window += 1
        if len(self._outcomes) > self.window and not self._outcomes.popleft():
            self.failures_in_window -= 1
        self.consecutive = 0 if ok else self.consecutive + 1
        too_many = self.consecutive >= self.consecutive_failures
        volume = len(self._outcomes)
        too_often = (
            volume >= self.min_volume and self.failures_in_window >= self.error_rate * volume
        )
        if not ok and (too_many or too_often):
            self._open(now, retry_after_s)

    def _open(self, now: float, retry_after_s: float | None) -> None:
        backoff_s = min(self.max_open_s, self.open_s * 2.0**self.reopens)
        self.state_ = _OPEN
        self.open_until = now + max(backoff_s, min(retry_after_s or 0.0, self.max_open_s))
        self.opens += 1
        self.reopens += 1
        self._probes_out = 0

    def _close(self) -> None:
        self.state_ = _CLOSED
        self.consecutive = 0
        self.failures_in_window = 0
        self.reopens = 0
        self._outcomes.clear()
        self._probes_out = 0

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "state": self.state(now).value,
            "consecutive_failures": self.consecutive,
            "recent_error_rate": (
                self.failures_in_window / len(self._outcomes) if self._outcomes else 0.0
            ),
            "open_for_s": max(0.0, self.open_until - now) if self.state_ is _OPEN else 0.0,
            "opens": self.opens,
        }


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """A producer's configured capacity; None means not configured (learned instead).

    `initial_concurrency` seeds the adaptive limit when `max_concurrency` is not set.
    `service_rate_hint` (weighted tokens/s) stands in for the measured rate until the pool has
    been saturated for long enough to measure it (scheduler.py, deadline estimates).
    """

    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    initial_concurrency: int = 16
    adaptive_max: int = 1024
    max_retry_after_s: float = 300.0
    service_rate_hint: float | None = None


class PoolCapacity:
    """Whether a producer may take one more request of `tokens` tokens now."""

    __slots__ = ("adaptive", "blocked_until", "inflight", "limits", "requests", "tokens")

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        ceiling = limits.max_concurrency or limits.adaptive_max
        self.adaptive = AdaptiveLimit(
            limits.max_concurrency or limits.initial_concurrency, max_limit=float(ceiling)
        )
        self.requests = SlidingWindow(limits.rpm) if limits.rpm else None
        self.tokens = SlidingWindow(limits.tpm) if limits.tpm else None
        self.inflight = 0
        self.blocked_until = 0.0

    @property
    def concurrency_limit(self) -> int:
        return self.adaptive.value

    def has_slot(self, now: float) -> bool:
        """The cheap half of `admits`: a free slot and no pause (windows not checked)."""
        return self.inflight < self.adaptive.value and now >= self.blocked_until

    def admits(self, tokens: float, now: float) -> bool:
        if self.inflight >= self.adaptive.value or now < self.blocked_until:
            return False
        if self.requests is not None and not self.requests.fits(1, now):
            return False
        return self.tokens is None or self.tokens.fits(tokens, now)

    def never_fits(self, tokens: float) -> bool:
        """A request larger than the whole tpm: no wait makes it fit (shed it at admission)."""
        return self.tokens is not None and tokens > self.tokens.limit

    def free_at(self, tokens: float, now: float) -> float | None:
        """When `admits` may turn true without a request finishing; None: only a finish helps."""
        if self.inflight >= self.adaptive.value:
            return None
        at = max(now, self.blocked_until)
        if self.requests is not None:
            at = max(at, now + (self.requests.wait_s(1, now) or 0.0))
        if self.tokens is not None:
            wait = self.tokens.wait_s(tokens, now)
            at = max(at, now + (wait if wait is not None else self.tokens.reset_s(now)))
        return at

    def start(self, tokens: float, now: float) -> WindowEntry | None:
        self.inflight += 1
        if self.requests is not None:
            self.requests.take(1, now)
        return self.tokens.take(tokens, now) if self.tokens is not None else None

    def finish(
        self,
        entry: WindowEntry | None,
        tokens: float,
        outcome: Outcome,
        started_at: float,
        now: float,
        retry_after_s: float | None = None,
    ) -> None:
        self.inflight -= 1
        if entry is not None and self.tokens is not None:
            self.tokens.correct(entry, tokens, now)
        if outcome is _OK:
            self.adaptive.on_success(self.inflight + 1)
        elif outcome in _CUTS:
            self.adaptive.on_congestion(started_at, now)
        if retry_after_s and outcome in _CUTS:
            pause_s = min(retry_after_s, self.limits.max_retry_after_s)
            self.blocked_until = max(self.blocked_until, now + pause_s)

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "inflight": self.inflight,
            "concurrency_limit": self.adaptive.value,
            "adaptive_limit": round(self.adaptive.limit, 3),
            "adaptive_cuts": self.adaptive.cuts,
            "max_concurrency": self.limits.max_concurrency,
            "paused_for_s": max(0.0, self.blocked_until - now),
            "rpm": self.limits.rpm,
            "rpm_used": self.requests.used(now) if self.requests is not None else None,
            "tpm": self.limits.tpm,
            "tpm_used": self.tokens.used(now) if self.tokens is not None else None,
        }


def counts_as_failure(outcome: Outcome) -> bool:
    """Whether a breaker should count this outcome against the deployment."""
    return outcome in _FAILURES
