"""Tariffs: markup, fixed prices, service tiers, time of use, per-account tariffs, list prices."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import msgspec
import pytest
import yaml

from tokenworks.config import loads
from tokenworks.metering.usage import Usage
from tokenworks.pricing.quote import Pricer, PricingError
from tokenworks.pricing.spec import PricingSpec

CONFIG = """
producers:
  - {name: openai, base_url: "https://api.openai.com/v1"}
  - {name: gpu, base_url: "http://gpu-1:8000/v1"}
models:
  - {name: gpt-5, deployments: [{producer: openai, model: gpt-5}]}
  - name: chat-fast
    deployments:
      - producer: gpu
        model: qwen3-32b
        cost: {input_per_mtok: "0.05", output_per_mtok: "0.20"}
"""

PRICING = """
currency: USD
default_tariff: retail
tariffs:
  retail:
    markup: "0.25"
    service_tiers: {priority: "2", flex: "0.5"}
    time_of_use:
      - {start: "22:00", end: "06:00", tz: "Europe/Berlin", multiplier: "0.5"}
    below_cost: allow
    fixed:
      chat-fast: {input_per_mtok: "0.10", output_per_mtok: "0.40"}
  at-cost: {}
  staff:
    markup: "0"
    default_service_tier: flex
    service_tiers: {flex: "0.5"}
    below_cost: allow
accounts:
  acct-internal: staff
"""

# 2026-11-18 is a Wednesday; Berlin is UTC+1 in November.
DAY = datetime(2026, 11, 18, 12, tzinfo=UTC)  # 13:00 Berlin
NIGHT = datetime(2026, 11, 18, 23, tzinfo=UTC)  # 00:00 Berlin


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    config = loads(CONFIG, check_prices=False)
    pricing = msgspec.convert(yaml.safe_load(PRICING), PricingSpec)
    return Pricer.from_config(
        SimpleNamespace(pricing=pricing, producers=config.producers, models=config.models)
    )


USAGE = Usage(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=1_000)
# gpt-5 standard: 1.25 input / 0.125 cached / 10 output:
# 2,000 x 1.25 + 8,000 x 0.125 + 1,000 x 10 = 2,500 + 1,000 + 10,000 = 13,500 micro-USD
GPT5_COST = 13_500_000


def q(pricer: Pricer, **kw):
    kw.setdefault("at", DAY)
    return pricer.quote("gpt-5", "openai", "gpt-5", USAGE, **kw)


def test_markup_over_cost(pricer: Pricer) -> None:
    quote = q(pricer)
    assert quote.cost_nano == GPT5_COST
    assert quote.price_nano == 16_875_000  # 13,500 x 1.25
    assert quote.service_tier == "standard"
    assert q(pricer, tariff="at-cost").price_nano == GPT5_COST


def test_service_tier_multipliers_over_the_producers_tier_price(pricer: Pricer) -> None:
    # gpt-5 priority costs 2.5 / 0.25 / 20: 2,000 x 2.5 + 8,000 x 0.25 + 1,000 x 20 = 27,000
    priority = q(pricer, service_tier="priority")
    assert priority.cost_nano == 27_000_000
    assert priority.price_nano == 67_500_000  # 27,000 x 1.25 markup x 2 tier
    # gpt-5 flex costs 0.625 / 0.0625 / 5: 1,250 + 500 + 5,000 = 6,750; x 1.25 x 0.5 = 4,218.75
    flex = q(pricer, service_tier="flex")
    assert (flex.cost_nano, flex.price_nano) == (6_750_000, 4_218_750)
    # OpenAI's request values: "auto" is the tariff default, "default" is standard.
    assert q(pricer, service_tier="auto").service_tier == "standard"
    assert q(pricer, service_tier="default").price_nano == 16_875_000


def test_unknown_service_tier_is_refused(pricer: Pricer) -> None:
    with pytest.raises(PricingError, match="'scale' is not offered by tariff 'retail'"):
        q(pricer, service_tier="scale")
    with pytest.raises(PricingError, match="not offered"):
        pricer.worst_case("gpt-5", "openai", "gpt-5", 10, 10, at=DAY, service_tier="turbo")


def test_key_default_tier(pricer: Pricer) -> None:
    # The staff tariff defaults to flex (a key default would be passed as service_tier).
    quote = q(pricer, tariff="staff")
    assert quote.service_tier == "flex"
    assert (quote.cost_nano, quote.price_nano) == (6_750_000, 3_375_000)


def test_time_of_use_night_discount(pricer: Pricer) -> None:
    assert q(pricer, at=NIGHT).price_nano == 8_437_500  # 16,875 x 0.5
    # The window is [22:00, 06:00) Berlin: 05:59 is in, 06:00 is out (05:00 / 04:59 UTC).
    assert q(pricer, at=datetime(2026, 11, 19, 4, 59, tzinfo=UTC)).price_nano == 8_437_500
    assert q(pricer, at=datetime(2026, 11, 19, 5, 0, tzinfo=UTC)).price_nano == 16_875_000
    assert q(pricer, at=datetime(2026, 11, 18, 20, 59, tzinfo=UTC)).price_nano == 16_875_000
    assert q(pricer, at=datetime(2026, 11, 18, 21, 0, tzinfo=UTC)).price_nano == 8_437_500
    # Cost does not follow the consumer's time of use.
    assert q(pricer, at=NIGHT).cost_nano == GPT5_COST
    # In summer Berlin is UTC+2: 21:00 UTC is 23:00 there, in the window.
    assert q(pricer, at=datetime(2026, 7, 1, 21, tzinfo=UTC)).price_nano == 8_437_500


def test_fixed_price_per_model(pricer: Pricer) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=500_000)
    quote = pricer.quote("chat-fast", "gpu", "qwen3-32b", usage, at=DAY)
    # cost: 1M x 0.05 + 0.5M x 0.20 = 0.05 + 0.10 = $0.15; price: 1M x 0.10 + 0.5M x 0.40 = $0.30
    assert (quote.cost_nano, quote.price_nano) == (150_000_000, 300_000_000)
    # Tier and time-of-use multipliers apply to fixed prices too.
    night = pricer.quote("chat-fast", "gpu", "qwen3-32b", usage, at=NIGHT, service_tier="priority")
    assert night.price_nano == 300_000_000  # x 2 x 0.5


def test_account_tariffs(pricer: Pricer) -> None:
    assert pricer.tariff_for("acct-internal") == "staff"
    assert pricer.tariff_for("acct-other") == "retail"
    assert pricer.tariff_for(None) == "retail"
    with pytest.raises(PricingError, match="unknown tariff"):
        q(pricer, tariff="nope")


def test_list_price(pricer: Pricer) -> None:
    # gpt-5: 1.25 / 10 x 1.25 markup by day; x 0.5 at night.
    assert pricer.list_price("gpt-5", at=DAY) == ("1.5625", "12.5")
    assert pricer.list_price("gpt-5", at=NIGHT) == ("0.78125", "6.25")
    assert pricer.list_price("gpt-5", tariff="staff", at=DAY) == ("0.3125", "2.5")  # flex x 0.5
    assert pricer.list_price("chat-fast", at=DAY) == ("0.1", "0.4")
    with pytest.raises(PricingError):
        pricer.list_price("nope")


def test_list_price_in_cny_is_exact_decimal() -> None:
    config = loads(
        """
producers: [{name: z, base_url: "https://open.bigmodel.cn/api/paas/v4", currency: CNY}]
models:
  - name: glm
    deployments: [{producer: z, model: glm-5.3, cost: {input_per_mtok: "8", output_per_mtok: "28"}}]
""",
        check_prices=False,
    )
    pricing = PricingSpec(exchange_rates={"CNY": "7.25"})
    pricer = Pricer.from_parts(pricing, config.producers, config.models)
    # 8 / 7.25 = 1.10344827586206... ; 28 / 7.25 = 3.86206896551724...
    assert pricer.list_price("glm", at=DAY) == ("1.103448276", "3.862068966")


def test_pricing_spec_rejects() -> None:
    with pytest.raises(msgspec.ValidationError, match="default_tariff 'x'"):
        msgspec.convert({"default_tariff": "x"}, PricingSpec)
    with pytest.raises(msgspec.ValidationError, match="unknown tariff"):
        msgspec.convert({"accounts": {"a": "gold"}}, PricingSpec)
    with pytest.raises(msgspec.ValidationError, match="3-letter"):
        msgspec.convert({"currency": "usd"}, PricingSpec)
    with pytest.raises(msgspec.ValidationError, match="must be > 0"):
        msgspec.convert({"exchange_rates": {"CNY": "0"}}, PricingSpec)
    with pytest.raises(msgspec.ValidationError, match="not a tier"):
        msgspec.convert({"tariffs": {"t": {"default_service_tier": "gold"}}, "default_tariff": "t"},
                        PricingSpec)  # fmt: skip


def test_fixed_price_for_unknown_model_is_a_config_error() -> None:
    config = loads(CONFIG, check_prices=False)
    pricing = msgspec.convert(
        {
            "tariffs": {
                "default": {"fixed": {"gtp-5": {"input_per_mtok": "1", "output_per_mtok": "2"}}}
            }
        },
        PricingSpec,
    )
    with pytest.raises(PricingError, match="fixed price for unknown model 'gtp-5'"):
        Pricer.from_parts(pricing, config.producers, config.models)
