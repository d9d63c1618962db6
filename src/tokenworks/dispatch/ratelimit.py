"""Consumer rate limits: requests and tokens per minute and concurrent requests, per scope.

A scope is a key or an account (`"key:<id>"`, `"account:<id>"`: the caller names them). One
`acquire` checks every scope a request draws on and takes from all of them or from none, so
no interleaving of requests can get more through than a limit:

- requests: at most `rpm` admissions in any 60 s window (a `SlidingWindow`, exact);
- tokens: the estimate is reserved at admission in a 60 s window and corrected to the actual
  when the answer ends (`settle`). With an estimate that bounds the actual (input bound +
  `max_tokens`, as the pricer's hold does) no window ever holds more than `tpm` tokens; with a
  smaller estimate the overshoot is at most the understatement, and it blocks the scope until
  it leaves the window;
- concurrency: at most `max_concurrency` permits held at once (acquire to settle, queue wait
  included).

Refusals say which scope and which limit, and how long until the same request would fit
(`retry_after_s`; None when only a finishing request can help, or when the request is larger
than the limit itself and never fits). `headers` gives OpenAI's x-ratelimit-* values.
Pure and synchronous: `now` comes from the caller's clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tokenworks.dispatch.capacity import SlidingWindow, WindowEntry
from tokenworks.keys.rate_limits import RateLimits

__all__ = ["CLOCK", "Permit", "RateLimiter", "RateLimits", "Refusal", "go_duration"]

WINDOW_S = 60.0
CLOCK = time.monotonic  # the gateway's clock for these windows (tests inject their own `now`)


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: str
    limit: str  # "requests", "tokens" or "concurrency"
    retry_after_s: float | None
    never_fits: bool = False


class _Scope:
    __slots__ = ("inflight", "limits", "requests", "tokens")

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self.requests = SlidingWindow(limits.rpm, WINDOW_S) if limits.rpm else None
        self.tokens = SlidingWindow(limits.tpm, WINDOW_S) if limits.tpm else None
        self.inflight = 0

    def resize(self, limits: RateLimits) -> None:
        # In place: permits in flight point at this object and settle against it.
        self.limits = limits
        self.requests = _resized(self.requests, limits.rpm)
        self.tokens = _resized(self.tokens, limits.tpm)


def _resized(window: SlidingWindow | None, limit: int | None) -> SlidingWindow | None:
    if not limit:
        return None
    if window is None:
        return SlidingWindow(limit, WINDOW_S)
    window.limit = limit
    return window


class Permit:
    """What one admitted request holds; hand it back to `settle` exactly once."""

    __slots__ = ("_entries", "_scopes", "settled", "tokens_reserved")

    def __init__(
        self,
        scopes: list[_Scope],
        entries: list[tuple[SlidingWindow, WindowEntry] | None],
        tokens: int,
    ) -> None:
        self._scopes = scopes
        self._entries = entries
        self.tokens_reserved = tokens
        self.settled = False

    def settle(self, tokens: int, now: float) -> None:
        """The answer ended (or failed, or the client left): actual tokens, concurrency back.
        Only the first call counts, so every way a request can end may call it."""
        if self.settled:
            return
        self.settled = True
        for state, taken in zip(self._scopes, self._entries, strict=True):
            state.inflight -= 1
            # The window the reservation went into, even if the scope's limits changed since.
            if taken is not None:
                taken[0].correct(taken[1], tokens, now)


class RateLimiter:
    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}

    def set_limits(self, scope: str, limits: RateLimits) -> None:
        """Set or change a scope's limits; what its windows already hold still counts."""
        current = self._scopes.get(scope)
        if current is None:
            self._scopes[scope] = _Scope(limits)
        elif current.limits != limits:
            current.resize(limits)

    def limits(self, scope: str) -> RateLimits | None:
        state = self._scopes.get(scope)
        return state.limits if state is not None else None

    def acquire(self, scopes: Sequence[str], tokens: int, now: float) -> Permit | Refusal:
        """Take one request and `tokens` (the estimate) from every limited scope, or none."""
        states = [self._scopes[s] for s in scopes if s in self._scopes]
        for name, state in zip((s for s in scopes if s in self._scopes), states, strict=True):
            cap = state.limits.max_concurrency
            if cap is not None and state.inflight >= cap:
                return Refusal(name, "concurrency", None)
            if state.requests is not None and not state.requests.fits(1, now):
                return Refusal(name, "requests", state.requests.wait_s(1, now))
            if state.tokens is not None and not state.tokens.fits(tokens, now):
                wait = state.tokens.wait_s(tokens, now)
                return Refusal(name, "tokens", wait, never_fits=wait is None)
        entries: list[tuple[SlidingWindow, WindowEntry] | None] = []
        for state in states:
            state.inflight += 1
            if state.requests is not None:
                state.requests.take(1, now)
            window = state.tokens
            entries.append((window, window.take(tokens, now)) if window is not None else None)
        return Permit(states, entries, tokens)

    def settle(self, permit: Permit, tokens: int, now: float) -> None:
        """The answer ended: see `Permit.settle`."""
        permit.settle(tokens, now)

    def headers(self, scopes: Sequence[str], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* for the tightest limited scope of each kind (none if none)."""
        out: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            tightest: tuple[float, SlidingWindow] | None = None
            for scope in scopes:
                state = self._scopes.get(scope)
                window = None if state is None else getattr(state, kind)
                if window is None:
                    continue
                remaining = window.remaining(now)
                if tightest is None or remaining < tightest[0]:
                    tightest = (remaining, window)
            if tightest is not None:
                remaining, window = tightest
                out[f"x-ratelimit-limit-{kind}"] = str(int(window.limit))
                out[f"x-ratelimit-remaining-{kind}"] = str(math.floor(remaining))
                out[f"x-ratelimit-reset-{kind}"] = go_duration(window.reset_s(now))
        return out

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {
            name: {
                "rpm": s.limits.rpm,
                "requests_used": s.requests.used(now) if s.requests is not None else None,
                "tpm": s.limits.tpm,
                "tokens_used": s.tokens.used(now) if s.tokens is not None else None,
                "max_concurrency": s.limits.max_concurrency,
                "inflight": s.inflight,
            }
            for name, s in sorted(self._scopes.items())
        }


def go_duration(seconds: float) -> str:
    """Seconds as Go's time.Duration prints them, as OpenAI's reset headers do: 12ms, 1.5s, 6m0s."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
