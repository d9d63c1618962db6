"""Property tests: monotone in tokens, exact tier switches, parts that sum to the whole, holds
that bound the settled amount, and money strings that round-trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenworks.config import loads
from tokenworks.metering.usage import Usage
from tokenworks.money import (
    RATE_DENOMINATOR,
    allocate,
    format_nano,
    parse_amount,
    round_half_up,
)
from tokenworks.pricing.quote import Pricer
from tokenworks.pricing.rates import split_usage
from tokenworks.pricing.spec import PricingSpec

CONFIG = """
producers:
  - {name: google, base_url: "https://generativelanguage.googleapis.com/v1beta"}
  - {name: anthropic, base_url: "https://api.anthropic.com/v1"}
  - {name: deepseek, base_url: "https://api.deepseek.com"}
  - {name: openai, base_url: "https://api.openai.com/v1"}
  - {name: zhipu, base_url: "https://open.bigmodel.cn/api/paas/v4", currency: CNY}
models:
  - {name: gemini, deployments: [{producer: google, model: gemini-2.5-pro}]}
  - {name: sonnet, deployments: [{producer: anthropic, model: claude-sonnet-4-5}]}
  - {name: ds, deployments: [{producer: deepseek, model: deepseek-v4-flash}]}
  - {name: gpt, deployments: [{producer: openai, model: gpt-5}]}
  - name: glm
    deployments:
      - producer: zhipu
        model: glm-4.5-air
        cost:
          input_per_mtok: "0.8"
          cached_input_per_mtok: "0.16"
          output_per_mtok: "2"
          reasoning_per_mtok: "2.5"
          tiers:
            - {output_over_tokens: 199, output_per_mtok: "6", reasoning_per_mtok: "7"}
            - {input_over_tokens: 31999, input_per_mtok: "1.2", cached_input_per_mtok: "0.24",
               output_per_mtok: "8", reasoning_per_mtok: "9"}
"""

PRICING = """
exchange_rates: {CNY: "7.25"}
tariffs:
  default: {markup: "0.3"}
  night:
    markup: "0.137"
    service_tiers: {priority: "1.7", flex: "0.45"}
    time_of_use: [{start: "23:00", end: "07:00", tz: "Asia/Shanghai", multiplier: "0.6"}]
    below_cost: allow
  fixed:
    fixed:
      glm: {input_per_mtok: "1.1", output_per_mtok: "3.3",
            tiers: [{input_over_tokens: 100000, input_per_mtok: "2.2", output_per_mtok: "6.6"}]}
"""

DEPLOYMENTS = {
    "gemini": ("google", "gemini-2.5-pro"),
    "sonnet": ("anthropic", "claude-sonnet-4-5"),
    "ds": ("deepseek", "deepseek-v4-flash"),
    "gpt": ("openai", "gpt-5"),
    "glm": ("zhipu", "glm-4.5-air"),
}


def _build() -> Pricer:
    config = loads(CONFIG, check_prices=False)
    spec = msgspec.convert(yaml.safe_load(PRICING), PricingSpec)
    return Pricer.from_parts(spec, config.producers, config.models)


PRICER = _build()
START = datetime(2026, 10, 1, tzinfo=UTC)

models = st.sampled_from(sorted(DEPLOYMENTS))
tariffs = st.sampled_from(["default", "night", "fixed"])
tiers = st.sampled_from([None, "standard", "priority", "flex"])
times = st.integers(0, 60 * 24 * 14).map(lambda m: START + timedelta(minutes=m))
tokens = st.integers(0, 400_000)


@st.composite
def usages(draw: st.DrawFn, max_input: int = 400_000, max_output: int = 40_000) -> Usage:
    input_tokens = draw(st.integers(0, max_input))
    cached = draw(st.integers(0, input_tokens))
    write = draw(st.integers(0, input_tokens - cached))
    output = draw(st.integers(0, max_output))
    reasoning = draw(st.integers(0, output))
    return Usage(input_tokens, cached, write, output, reasoning)


def _quote(model: str, usage: Usage, **kw):
    return PRICER.quote(model, *DEPLOYMENTS[model], usage, **kw)


@settings(max_examples=300, deadline=None)
@given(models, usages(), st.sampled_from(range(5)), st.integers(1, 50_000), times, tariffs, tiers)
def test_monotone_in_every_token_class(model, usage, cls, extra, at, tariff, tier) -> None:
    """More tokens of any class never cost or price less (tiers only ever raise rates)."""
    bigger = Usage(
        usage.input_tokens + (extra if cls in (0, 1, 2) else 0),
        usage.cached_input_tokens + (extra if cls == 1 else 0),
        usage.cache_write_tokens + (extra if cls == 2 else 0),
        usage.output_tokens + (extra if cls in (3, 4) else 0),
        usage.reasoning_tokens + (extra if cls == 4 else 0),
    )
    kw = {"at": at, "tariff": tariff, "service_tier": tier}
    small, big = _quote(model, usage, **kw), _quote(model, bigger, **kw)
    assert big.cost_nano >= small.cost_nano
    assert big.price_nano >= small.price_nano


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 1_000_000), st.integers(0, 1_000))
def test_gemini_tier_switches_exactly_past_200k(input_tokens: int, output_tokens: int) -> None:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    # Hand rates in micro-USD per token: <= 200k: 1.25 / 10; above: 2.5 / 15.
    if input_tokens <= 200_000:
        micro = Fraction(125, 100) * input_tokens + 10 * output_tokens
    else:
        micro = Fraction(25, 10) * input_tokens + 15 * output_tokens
    nano = micro * 1000
    expected = round_half_up(nano.numerator, nano.denominator)
    assert _quote("gemini", usage, at=START).cost_nano == expected


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 60_000), st.integers(0, 1_000))
def test_glm_tiers_switch_exactly(input_tokens: int, output_tokens: int) -> None:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    if input_tokens >= 32_000:
        in_rate, out_rate = Fraction(12, 10), 8
    elif output_tokens >= 200:
        in_rate, out_rate = Fraction(8, 10), 6
    else:
        in_rate, out_rate = Fraction(8, 10), 2
    nano = (in_rate * input_tokens + out_rate * output_tokens) * 1000 / Fraction(725, 100)
    expected = round_half_up(nano.numerator, nano.denominator)
    assert _quote("glm", usage, at=START).cost_nano == expected


@settings(max_examples=200, deadline=None)
@given(models, usages(), times, tariffs, tiers)
def test_lines_sum_to_the_quote(model, usage, at, tariff, tier) -> None:
    quote, lines = PRICER.explain(
        model, *DEPLOYMENTS[model], usage, at=at, tariff=tariff, service_tier=tier
    )
    assert sum(line.cost_nano for line in lines) == quote.cost_nano
    assert sum(line.price_nano for line in lines) == quote.price_nano
    assert sum(line.tokens for line in lines) == usage.input_tokens + usage.output_tokens
    assert quote == _quote(model, usage, at=at, tariff=tariff, service_tier=tier)


@settings(max_examples=200, deadline=None)
@given(models, usages(max_input=100_000), usages(max_input=100_000), times)
def test_two_requests_cost_the_sum_within_rounding(model, a, b, at) -> None:
    """Within one tier, cost is additive: each rounding moves a total by at most half a nano."""
    both = Usage(*(x + y for x, y in zip(_fields(a), _fields(b), strict=True)))
    table_of = PRICER._deployments[(model, *DEPLOYMENTS[model])].schedule.table_at(at)
    split_a, split_b, split_ab = split_usage(a), split_usage(b), split_usage(both)
    in_ab = sum(split_ab[:4])
    out_ab = sum(split_ab[4:])
    rates = table_of.rates_for(in_ab, out_ab)
    if rates != table_of.rates_for(sum(split_a[:4]), sum(split_a[4:])) or rates != (
        table_of.rates_for(sum(split_b[:4]), sum(split_b[4:]))
    ):
        return  # a cliff between them: not additive by design
    assert rates.amount(split_a) + rates.amount(split_b) == rates.amount(split_ab)
    qa, qb, qab = (_quote(model, u, at=at).cost_nano for u in (a, b, both))
    assert abs(qa + qb - qab) <= 1


def _fields(u: Usage) -> tuple[int, ...]:
    return (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
            u.reasoning_tokens)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(models, usages(), st.integers(0, 400_000), st.integers(0, 40_000), times, tariffs, tiers)
def test_worst_case_bounds_every_actual(model, usage, more_in, more_out, at, tariff, tier) -> None:
    """A hold for (input, max_tokens) covers any usage within them, whatever the split."""
    held_in = usage.input_tokens + more_in
    held_out = usage.output_tokens + more_out
    kw = {"at": at, "tariff": tariff, "service_tier": tier}
    hold = PRICER.worst_case(model, *DEPLOYMENTS[model], held_in, held_out, **kw)
    actual = _quote(model, usage, **kw)
    assert hold.cost_nano >= actual.cost_nano
    assert hold.price_nano >= actual.price_nano


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**20), 10**20))
def test_amount_strings_round_trip(amount_nano: int) -> None:
    text = format_nano(amount_nano)
    assert "e" not in text.lower()
    assert parse_amount(text) == amount_nano


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**24), min_size=1, max_size=8), st.integers(1, 10**19))
def test_allocate_sums_to_rounded_total(parts: list[int], denominator: int) -> None:
    shares = allocate(parts, denominator)
    assert sum(shares) == round_half_up(sum(parts), denominator)
    for part, share in zip(parts, shares, strict=True):
        assert part // denominator <= share <= part // denominator + 1


@pytest.mark.parametrize(
    "bad", ["1.0000000001", "1e3", "1E-9", " 1", "1 ", "+1", "1.", ".5", "NaN", "inf", "0x10",
            "1_000", "", "١٢", "1\n", "9" * 41]
)  # fmt: skip
def test_parse_amount_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_amount(bad)


@pytest.mark.parametrize("bad", [1.5, 1, None, b"1"])
def test_parse_amount_rejects_non_strings(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_amount(bad)  # type: ignore[arg-type]


def test_money_examples() -> None:
    assert parse_amount("12.345") == 12_345_000_000
    assert parse_amount("-0.000000001") == -1
    assert parse_amount("0") == 0
    assert format_nano(12_345_000_000) == "12.345"
    assert format_nano(1) == "0.000000001"
    assert format_nano(-1_500_000_000) == "-1.5"
    assert format_nano(0) == "0"
    assert RATE_DENOMINATOR == 10**18
