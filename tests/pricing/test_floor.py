"""Prices are never below cost unless a tariff says so; the bounds a model's requests are held
and checked against come from the config or the price book."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tokenworks.config import ConfigError, loads
from tokenworks.dispatch.billing import (
    DEFAULT_CONTEXT_WINDOW_TOKENS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    ModelBounds,
)
from tokenworks.metering.usage import Usage
from tokenworks.pricing.quote import Pricer

BASE = """\
producers:
  - {name: gpu, base_url: "http://gpu-1:8000/v1"}
  - {name: openai, base_url: "https://api.openai.com/v1", provider: openai}
models:
  - name: m
    deployments:
      - {producer: gpu, model: q, cost: {input_per_mtok: "1.00", output_per_mtok: "2.00"}}
  - name: gpt
    deployments:
      - {producer: openai, model: gpt-4o}
"""
AT = datetime(2026, 3, 4, 12, tzinfo=UTC)
USAGE = Usage(input_tokens=1_000_000, output_tokens=1_000_000)  # costs 3.00 on m


@pytest.mark.parametrize(
    "tariff",
    [
        '{markup: "0.25", service_tiers: {flex: "0.5"}}',
        '{time_of_use: [{start: "22:00", end: "06:00", multiplier: "0.9"}]}',
        '{markup: "0.1", service_tiers: {priority: "2", standard: "0.8"}}',
    ],
)
def test_a_tariff_that_would_sell_below_cost_is_refused_at_load(tariff: str) -> None:
    text = BASE + f"pricing:\n  default_tariff: t\n  tariffs:\n    t: {tariff}\n"
    with pytest.raises(ConfigError) as err:
        loads(text, "gw.yaml")
    message = str(err.value)
    assert message.startswith("gw.yaml:12:"), message  # the `pricing:` line
    assert "tariff 't' sells below cost" in message and "below_cost: allow" in message


def test_a_tariff_may_sell_below_cost_when_it_says_so() -> None:
    tariff = '{markup: "0.25", service_tiers: {flex: "0.5"}, below_cost: allow}'
    config = loads(BASE + f"pricing:\n  default_tariff: t\n  tariffs:\n    t: {tariff}\n")
    quote = Pricer.from_config(config).quote("m", "gpu", "q", USAGE, at=AT, service_tier="flex")
    assert (quote.cost_nano, quote.price_nano) == (3_000_000_000, 1_875_000_000)


def test_a_fixed_price_below_the_deployments_cost_is_raised_to_cost() -> None:
    """A fixed price cannot be checked against every deployment, hour and token mix at load:
    the request's price is floored at its cost instead."""
    fixed = '{fixed: {m: {input_per_mtok: "0.50", output_per_mtok: "0.50"}}}'
    config = loads(BASE + f"pricing:\n  default_tariff: t\n  tariffs:\n    t: {fixed}\n")
    pricer = Pricer.from_config(config)
    quote = pricer.quote("m", "gpu", "q", USAGE, at=AT)
    assert quote.price_nano == quote.cost_nano == 3_000_000_000
    explained, lines = pricer.explain("m", "gpu", "q", USAGE, at=AT)
    assert explained == quote
    assert [line.price_nano for line in lines] == [line.cost_nano for line in lines]
    worst = pricer.worst_case("m", "gpu", "q", 1_000_000, 1_000_000, at=AT)
    assert worst.price_nano >= worst.cost_nano >= quote.cost_nano
    allowed = fixed[:-1] + ", below_cost: allow}"
    config = loads(BASE + f"pricing:\n  default_tariff: t\n  tariffs:\n    t: {allowed}\n")
    assert (
        Pricer.from_config(config).quote("m", "gpu", "q", USAGE, at=AT).price_nano == 1_000_000_000
    )


def test_model_bounds_come_from_the_config_then_the_price_book() -> None:
    config = loads(BASE)
    pricer = Pricer.from_config(config)
    own, gpt = config.models
    assert ModelBounds.of(gpt, pricer) == ModelBounds(128_000, 128_000)  # gpt-4o's window
    unknown = ModelBounds.of(own, pricer)
    assert unknown == ModelBounds(DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_CONTEXT_WINDOW_TOKENS)
    text = BASE.replace(
        "  - name: m\n",
        "  - name: m\n    max_output_tokens: 8000\n    context_window_tokens: 32000\n",
    )
    assert ModelBounds.of(loads(text).models[0], pricer) == ModelBounds(8_000, 32_000)


@pytest.mark.parametrize("value", [".nan", "0", "-1", ".inf", "3601"])
def test_the_client_stall_timeout_must_be_sane(value: str) -> None:
    with pytest.raises(ConfigError, match="client_stall_timeout_s"):
        loads(BASE + f"limits:\n  client_stall_timeout_s: {value}\n", "gw.yaml")
