"""Prices through the gateway: every response and usage record carries its exact cost and price.

Test deployments cost 1.00 per million input and 2.00 per million output tokens, so a request
costs input x 1,000 + output x 2,000 nano-units; the tariffs below are checked by hand.
"""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import Sim

CHAT = [{"role": "user", "content": "What does a kilowatt-hour cost at night?"}]
MODELS = """\
models:
  - name: m
    deployments:
      - {producer: a, model: sim-small}
"""
TARIFF = """\
pricing:
  default_tariff: retail
  tariffs:
    retail:
      markup: "0.5"
      service_tiers: {priority: "2", flex: "0.5"}
      below_cost: allow  # flex at 0.75 of cost, on purpose
"""


def nano(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


@pytest.fixture
def priced(make_gateway, sims: tuple[Sim, Sim]):
    a, _ = sims
    with make_gateway({"a": a.url}, MODELS, TARIFF) as gw:
        yield gw


def test_plain_response_carries_cost_and_price(priced) -> None:
    key = priced.create_key()
    raw = openai.OpenAI(base_url=priced.v1, api_key=key["key"], max_retries=0)
    response = raw.chat.completions.with_raw_response.create(
        model="m", messages=CHAT, max_tokens=10
    )
    reply = response.parse()
    cost = reply.usage.prompt_tokens * 1_000 + 10 * 2_000
    price = cost * 3 // 2  # markup 0.5; exact here since cost is a multiple of 2
    assert "x-tokenworks-cost" not in response.headers  # the operator's cost is its own
    assert nano(response.headers["x-tokenworks-price"]) == price
    assert nano(reply.usage.model_extra["cost"]) == price
    [record] = priced.records()
    assert (record.cost_nano, record.price_nano) == (cost, price)
    assert record.service_tier == "standard"
    [row] = priced.usage(group_by="model")
    assert row["cost_nano"] == cost and nano(row["price"]) == price


def test_stream_usage_chunk_carries_the_price_and_tiers_multiply(priced) -> None:
    key = priced.create_key()
    c = openai.OpenAI(base_url=priced.v1, api_key=key["key"], max_retries=0)
    chunks = list(
        c.chat.completions.create(
            model="m",
            messages=CHAT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            service_tier="priority",
        )
    )
    usage = chunks[-1].usage
    cost = usage.prompt_tokens * 1_000 + 8 * 2_000
    assert nano(usage.model_extra["cost"]) == cost * 3  # x1.5 markup x2 priority
    [record] = priced.records()
    assert record.service_tier == "priority" and record.price_nano == cost * 3


def test_unknown_service_tier_is_400_before_any_upstream_work(priced, sims) -> None:
    a, _ = sims
    key = priced.create_key()
    r = httpx.post(
        f"{priced.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"model": "m", "messages": CHAT, "service_tier": "platinum"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"
    assert a.stats()["requests_total"] == 0


def test_models_list_shows_the_consumer_price(priced) -> None:
    key = priced.create_key()
    r = httpx.get(f"{priced.v1}/models", headers={"Authorization": f"Bearer {key['key']}"})
    [model] = r.json()["data"]
    assert model["pricing"] == {"currency": "USD", "input_per_mtok": "1.5", "output_per_mtok": "3"}


def test_estimated_usage_is_priced_too(priced) -> None:
    key = priced.create_key()
    with httpx.stream(
        "POST",
        f"{priced.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={
            "model": "m",
            "messages": CHAT,
            "max_tokens": 6,
            "stream": True,
            "sim_fault": "no_usage",
        },
    ) as r:
        body = r.read().decode()
    assert "cost" not in body
    [record] = priced.records()
    u = record.usage
    assert u.estimated and record.cost_nano == u.input_tokens * 1_000 + u.output_tokens * 2_000
    assert record.price_nano == record.cost_nano * 3 // 2


def test_unpriced_deployment_is_refused_at_config_load(make_gateway, sims) -> None:
    from tokenworks.config import ConfigError

    a, _ = sims
    bare = "models:\n  - name: m\n    deployments:\n      - producer: a\n        model: mystery\n"
    with pytest.raises(ConfigError) as err, make_gateway({"a": a.url}, bare):
        pass
    assert "cannot price" in str(err.value) and "mystery" in str(err.value)
    assert json.dumps(str(err.value))


def test_a_key_default_service_tier_prices_and_routes_its_requests(priced) -> None:
    r = priced.admin("POST", "/admin/v1/keys", json={"name": "night", "service_tier": "flex"})
    assert r.status_code == 201, r.text
    key = r.json()
    reply = openai.OpenAI(
        base_url=priced.v1, api_key=key["key"], max_retries=0
    ).chat.completions.create(model="m", messages=CHAT, max_tokens=10)
    assert reply.service_tier == "flex"  # the upstream was asked for flex too
    cost = reply.usage.prompt_tokens * 1_000 + 10 * 2_000
    [record] = priced.records()
    assert record.service_tier == "flex"
    assert record.price_nano == cost * 3 // 4  # x1.5 markup x0.5 flex
    r = priced.admin("POST", "/admin/v1/keys", json={"name": "bad", "service_tier": "gold"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


def test_the_cost_header_is_sent_only_when_the_config_exposes_it(make_gateway, sims) -> None:
    a, _ = sims
    with make_gateway({"a": a.url}, MODELS, TARIFF + "expose_cost_header: true\n") as gw:
        key = gw.create_key()
        raw = openai.OpenAI(base_url=gw.v1, api_key=key["key"], max_retries=0)
        response = raw.chat.completions.with_raw_response.create(
            model="m", messages=CHAT, max_tokens=10
        )
        reply = response.parse()
        cost = reply.usage.prompt_tokens * 1_000 + 10 * 2_000
        assert nano(response.headers["x-tokenworks-cost"]) == cost
