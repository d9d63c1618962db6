"""Routing strategies and the `provider` object, without HTTP: injected prices, speeds, RNG."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from tokenworks.config import Config, Deployment, loads
from tokenworks.dispatch.errors import NoProviderLeft
from tokenworks.dispatch.preferences import parse_provider
from tokenworks.dispatch.relay import Call
from tokenworks.dispatch.router import Router
from tokenworks.dispatch.speeds import PROBE_INTERVAL_S, STALE_AFTER_S, Speeds
from tokenworks.keys.store import ApiKey
from tokenworks.pricing.quote import Pricer

# a: dear by day, cheap off-peak (16:30-00:30 UTC, DeepSeek-style); b: flat, in between;
# c: dearest.
CONFIG = """
producers:
  - {name: a, base_url: "http://127.0.0.1:1/v1"}
  - {name: b, base_url: "http://127.0.0.1:2/v1"}
  - {name: c, base_url: "http://127.0.0.1:3/v1"}
models:
  - name: m
    routing: %s
    deployments:
      - producer: a
        model: up-a
        weight: %s
        cost:
          input_per_mtok: "1.00"
          output_per_mtok: "4.00"
          windows:
            - {start: "16:30", end: "00:30", input_per_mtok: "0.25", output_per_mtok: "1.00"}
      - {producer: b, model: up-b, weight: %s,
         cost: {input_per_mtok: "0.60", output_per_mtok: "2.00"}}
      - {producer: c, model: up-c, weight: %s,
         cost: {input_per_mtok: "3.00", output_per_mtok: "9.00"}}
"""

DAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Down:
    """Breakers by producer name: those in `producers` are open."""

    def __init__(self) -> None:
        self.producers: set[str] = set()

    def available(self, deployment: Deployment) -> bool:
        return deployment.producer not in self.producers


def config(routing: str = "ordered", weights: tuple[float, float, float] = (1, 1, 1)) -> Config:
    return loads(CONFIG % (routing, *weights))


def router(cfg: Config, *, seed: int = 1, clock: Clock | None = None) -> Router:
    speeds = Speeds(
        ((d.producer, d.model) for m in cfg.models for d in m.deployments),
        clock=clock or Clock(),
    )
    return Router(cfg, Down(), Pricer.from_config(cfg), speeds=speeds, rng=random.Random(seed))


KEY = ApiKey(
    id="k", name="k", key_hash="", key_hint="", models=None, account_id=None, parent_id=None,
    created_ms=0, expires_ms=None, revoked_ms=None, metadata={},
)  # fmt: skip


def call(r: Router, *, at: datetime = DAY, provider: Any = None, **payload: Any) -> Call:
    route = r.get("m")
    assert route is not None
    return Call(
        endpoint="chat",
        payload={"model": "m", "messages": [], **payload},
        key=KEY,
        route=route,
        stream=False,
        client_wants_usage=False,
        tags={},
        body_bytes=4000,
        at=at,
        provider=None if provider is None else parse_provider(provider),
    )


def producers(r: Router, c: Call, max_attempts: int = 3) -> list[str]:
    return [d.producer for d in r.candidates(c.route, max_attempts, c)]


def test_ordered_is_the_default_and_keeps_the_configured_order() -> None:
    r = router(config())
    assert producers(r, call(r)) == ["a", "b", "c"]
    assert producers(r, call(r), 2) == ["a", "b"]


def test_cheapest_follows_the_time_of_day_price() -> None:
    r = router(config("cheapest"))
    assert producers(r, call(r, at=DAY)) == ["b", "a", "c"]
    assert producers(r, call(r, at=NIGHT)) == ["a", "b", "c"]  # a's off-peak window


def test_cheapest_prices_this_request_s_mix_of_input_and_output() -> None:
    # x: cheap input, dear output; y: the reverse. A long prompt with a short answer goes to
    # x, a short prompt with a long answer to y.
    cfg = loads(
        """
producers:
  - {name: x, base_url: "http://127.0.0.1:1/v1"}
  - {name: y, base_url: "http://127.0.0.1:2/v1"}
models:
  - name: m
    routing: cheapest
    deployments:
      - {producer: y, model: u, cost: {input_per_mtok: "2.00", output_per_mtok: "1.00"}}
      - {producer: x, model: u, cost: {input_per_mtok: "0.10", output_per_mtok: "8.00"}}
"""
    )
    r = router(cfg)
    long_prompt = call(r, max_tokens=10)
    long_prompt.body_bytes = 400_000
    assert producers(r, long_prompt) == ["x", "y"]
    short_prompt = call(r, max_tokens=4000)
    short_prompt.body_bytes = 400
    assert producers(r, short_prompt) == ["y", "x"]


def test_cheapest_takes_the_service_tier_s_price() -> None:
    text = CONFIG % ("cheapest", 1, 1, 1)
    text = text.replace(
        'cost: {input_per_mtok: "0.60", output_per_mtok: "2.00"}',
        'cost: {input_per_mtok: "0.60", output_per_mtok: "2.00",'
        ' service_tiers: {priority: {input_per_mtok: "5.00", output_per_mtok: "9.50"}}}',
    )
    r = router(loads(text))
    assert producers(r, call(r)) == ["b", "a", "c"]
    assert producers(r, call(r, service_tier="priority")) == ["a", "c", "b"]


def test_weighted_order_is_random_by_weight_without_replacement() -> None:
    r = router(config("weighted", (6, 3, 1)), seed=7)
    firsts: Counter[str] = Counter()
    for _ in range(3000):
        order = producers(r, call(r))
        assert sorted(order) == ["a", "b", "c"]  # every deployment, once
        firsts[order[0]] += 1
    # P(first) = weight / total: 0.6, 0.3, 0.1 (binomial sd < 0.01 at n=3000).
    assert abs(firsts["a"] / 3000 - 0.6) < 0.04
    assert abs(firsts["b"] / 3000 - 0.3) < 0.04
    assert abs(firsts["c"] / 3000 - 0.1) < 0.03


def test_weighted_is_deterministic_under_a_seeded_rng() -> None:
    one = router(config("weighted", (1, 1, 1)), seed=3)
    two = router(config("weighted", (1, 1, 1)), seed=3)
    assert [producers(one, call(one)) for _ in range(20)] == [
        producers(two, call(two)) for _ in range(20)
    ]


def test_weight_zero_is_only_a_fallback() -> None:
    r = router(config("weighted", (0, 1, 0)), seed=5)
    for _ in range(50):
        assert producers(r, call(r)) == ["b", "a", "c"]


def test_fastest_explores_unknown_deployments_then_ranks_by_learned_speed() -> None:
    clock = Clock()
    r = router(config("fastest"), clock=clock)
    assert r.speeds.learning  # a fastest model learns from the first request
    # Nothing known: each deployment is probed once, one per request, in configured order.
    assert producers(r, call(r))[0] == "a"
    assert producers(r, call(r))[0] == "b"
    assert producers(r, call(r))[0] == "c"
    assert producers(r, call(r)) == ["a", "b", "c"]  # probes out: configured order
    speeds = r.speeds
    # 1024 tokens: a 0.5 s + 1024/100 = 10.7 s; b 2.0 s + 1024/1000 = 3.0 s; c 0.1 + 1024/50.
    speeds.observe("a", "up-a", 0.5, 100, 1.0)
    speeds.observe("b", "up-b", 2.0, 1000, 1.0)
    speeds.observe("c", "up-c", 0.1, 50, 1.0)
    assert producers(r, call(r)) == ["b", "a", "c"]
    # A short answer makes time to first token decide.
    assert producers(r, call(r, max_tokens=10)) == ["c", "a", "b"]


def test_fastest_looks_again_at_a_stale_deployment_once_per_probe_interval() -> None:
    clock = Clock()
    r = router(config("fastest"), clock=clock)
    for name, model, rate in (("a", "up-a", 10), ("b", "up-b", 1000), ("c", "up-c", 500)):
        r.speeds.observe(name, model, 0.1, rate, 1.0)
    assert producers(r, call(r)) == ["b", "c", "a"]
    clock.now_s += STALE_AFTER_S + 1  # all stale now: one probe each, slowest included
    r.speeds.observe("b", "up-b", 0.1, 1000, 1.0)
    r.speeds.observe("c", "up-c", 0.1, 500, 1.0)
    assert producers(r, call(r)) == ["a", "b", "c"]  # a's probe
    assert producers(r, call(r)) == ["b", "c", "a"]  # no second probe at once
    clock.now_s += PROBE_INTERVAL_S
    assert producers(r, call(r))[0] == "a"  # still stale (the probe taught nothing): again


def test_sort_overrides_the_model_s_strategy() -> None:
    r = router(config("ordered"))
    r.speeds.observe("a", "up-a", 3.0, 900, 1.0)
    r.speeds.observe("b", "up-b", 0.2, 100, 1.0)
    r.speeds.observe("c", "up-c", 1.0, 500, 1.0)
    assert producers(r, call(r, provider={"sort": "price"})) == ["b", "a", "c"]
    assert producers(r, call(r, provider={"sort": "throughput"})) == ["a", "c", "b"]
    assert producers(r, call(r, provider={"sort": {"by": "latency"}})) == ["b", "c", "a"]


def test_only_ignore_and_order() -> None:
    r = router(config("cheapest"))
    assert producers(r, call(r, provider={"only": ["c", "A"]})) == ["a", "c"]
    assert producers(r, call(r, provider={"ignore": ["b"]})) == ["a", "c"]
    assert producers(r, call(r, provider={"order": ["c"]})) == ["c", "b", "a"]
    assert producers(r, call(r, provider={"order": ["c", "a"], "allow_fallbacks": False})) == [
        "c",
        "a",
    ]
    assert producers(r, call(r, provider={"allow_fallbacks": False})) == ["b"]
    # An unknown name in `order` is skipped, not an error, while fallbacks are allowed.
    assert producers(r, call(r, provider={"order": ["zz", "a"]})) == ["a", "b", "c"]


def test_unavailable_deployments_still_go_last_after_the_provider_order() -> None:
    r = router(config("cheapest"))
    r.health.producers.add("c")
    assert producers(r, call(r, provider={"order": ["c"]})) == ["b", "a", "c"]
    r.health.producers.add("b")
    assert producers(r, call(r)) == ["a", "b", "c"]
    assert producers(r, call(r, provider={"allow_fallbacks": False})) == ["a"]


def test_max_price_filters_by_this_request_s_unit_prices() -> None:
    r = router(config("ordered"))
    cap = {"max_price": {"prompt": 1, "completion": "2.5"}}
    assert producers(r, call(r, provider=cap)) == ["b"]
    assert producers(r, call(r, provider=cap, at=NIGHT)) == ["a", "b"]  # a is cheap at night
    assert producers(r, call(r, provider={"max_price": {"completion": 9}})) == ["a", "b", "c"]
    assert producers(r, call(r, provider={"max_price": {"request": 0}})) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ({"only": ["nobody"]}, "provider.only"),
        ({"ignore": ["a", "b", "c"]}, "provider.ignore"),
        ({"max_price": {"prompt": "0.1"}}, "provider.max_price"),
        ({"order": ["nobody"], "allow_fallbacks": False}, "provider.order"),
        ({"only": ["a"], "max_price": {"completion": 1}}, "provider.max_price"),
    ],
)
def test_constraints_that_leave_nothing_name_themselves(provider: Any, param: str) -> None:
    r = router(config("cheapest"))
    with pytest.raises(NoProviderLeft) as caught:
        r.candidates(r.routes["m"], 3, call(r, provider=provider))
    assert caught.value.param == param
    assert caught.value.status == 400


def test_max_price_error_says_what_the_lowest_prices_are() -> None:
    r = router(config())
    with pytest.raises(NoProviderLeft, match=r"lowest now are 0\.6 USD .* 2 USD"):
        r.candidates(r.routes["m"], 3, call(r, provider={"max_price": {"prompt": "0.5"}}))


def test_ordered_without_provider_is_today_s_path() -> None:
    """The default path must not rank or price: a router without pricer or speeds serves."""
    cfg = config()
    r = Router(cfg, Down())
    r.pricer = None
    del r.speeds  # touching it would raise
    route = r.routes["m"]
    assert [d.producer for d in r.candidates(route, 3)] == ["a", "b", "c"]
    assert [d.producer for d in r.candidates(route, 3, call(r))] == ["a", "b", "c"]


def test_max_price_leaves_an_unpriceable_request_to_the_hold_to_refuse() -> None:
    """An unknown service tier is the tier's 400 (from billing), not a max_price one."""
    r = router(config())
    c = call(r, service_tier="turbo", provider={"max_price": {"prompt": 1}})
    assert producers(r, c) == ["a", "b", "c"]
