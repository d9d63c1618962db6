"""Cost of consumer rate limits per request, against a key without limits, in one run.

Times, per request, what the relay does for a limited key (`Admission.admit`'s work: refresh
the scopes' limits, acquire from the key's and the account's windows, build the x-ratelimit
headers, settle with the actual tokens) and what it does for a key without limits (one
attribute check). Windows stay full of live entries (rpm/tpm far above the rate), so every
call also expires one entry, as a steady gateway does. Thread CPU time, so that other
processes on a shared machine cost less noise.

    .venv/bin/python bench/ratelimit.py [--requests 200000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenworks.dispatch.ratelimit import Permit, RateLimiter
from tokenworks.keys.rate_limits import RateLimits

KEY = RateLimits(rpm=10**9, tpm=10**12, max_concurrency=10**6)
ACCOUNT = RateLimits(rpm=10**9, tpm=10**12)


class Key:
    __slots__ = ("rate_scopes",)

    def __init__(self, scopes: tuple[tuple[str, RateLimits], ...]) -> None:
        self.rate_scopes = scopes


def run(requests: int) -> tuple[list[float], list[float]]:
    limiter = RateLimiter()
    limited = Key((("key:k", KEY), ("account:1", ACCOUNT)))
    plain = Key(())
    clock = time.thread_time_ns
    now = 0.0
    with_limits: list[float] = []
    without: list[float] = []
    for _ in range(requests):
        now += 60.0 / 50_000  # 50,000 requests per minute: windows hold ~50,000 entries
        start = clock()
        if limited.rate_scopes:
            names = []
            for name, limits in limited.rate_scopes:
                limiter.set_limits(name, limits)
                names.append(name)
            permit = limiter.acquire(names, 1_200, now)
            limiter.headers(names, now)
            assert isinstance(permit, Permit)
            permit.settle(800, now)
        with_limits.append(clock() - start)
        start = clock()
        if plain.rate_scopes:
            raise AssertionError
        without.append(clock() - start)
    return with_limits, without


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    with_limits, without = run(args.requests)
    for name, ns in (("limited key", with_limits), ("key without limits", without)):
        ns.sort()
        print(
            f"{name:>20}: median {statistics.median(ns) / 1000:.2f} us, "
            f"p99 {ns[int(len(ns) * 0.99)] / 1000:.2f} us"
        )


if __name__ == "__main__":
    main()
