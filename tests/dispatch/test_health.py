"""Producer health and the router's candidate order, without HTTP."""

from __future__ import annotations

import time

from tokenworks.config import Deployment, Model
from tokenworks.dispatch.health import COOLDOWN_S, FAILURES_TO_OPEN, Health
from tokenworks.dispatch.router import Route, Router


def test_a_producer_cools_down_after_consecutive_failures_only() -> None:
    health = Health()
    for _ in range(FAILURES_TO_OPEN - 1):
        health.failed("a")
    assert health.healthy("a")
    health.ok("a")  # a success in between starts the count again
    for _ in range(FAILURES_TO_OPEN - 1):
        health.failed("a")
    assert health.healthy("a")
    health.failed("a")
    now = time.monotonic()
    assert not health.healthy("a", now)
    assert health.healthy("a", now + COOLDOWN_S + 1)
    assert health.snapshot()["a"] == {"consecutive_failures": FAILURES_TO_OPEN, "healthy": False}


def test_retry_after_opens_at_once_for_at_least_the_cooldown_and_at_most_300_s() -> None:
    health = Health()
    health.failed("a", retry_after_s=0.5)
    now = time.monotonic()
    assert not health.healthy("a", now + COOLDOWN_S - 1)  # never shorter than the cooldown
    health.failed("b", retry_after_s=10_000)
    now = time.monotonic()
    assert not health.healthy("b", now + 299)
    assert health.healthy("b", now + 301)
    health.ok("a")
    assert health.healthy("a")


def test_cooling_producers_go_last_and_are_never_dropped() -> None:
    health = Health()
    a, b, c = (Deployment(producer=p, model="m") for p in "abc")
    route = Route(model=Model(name="m", deployments=[a, b, c]), deployments=(a, b, c), encoding="")
    router = Router.__new__(Router)  # the route is built here; no config needed
    router.health = health
    assert router.candidates(route, 3) == [a, b, c]
    health.failed("a", retry_after_s=30)
    assert router.candidates(route, 3) == [b, c, a]
    assert router.candidates(route, 2) == [b, c]
    for p in "bc":
        health.failed(p, retry_after_s=30)
    assert router.candidates(route, 3) == [a, b, c]  # all cooling: configured order
