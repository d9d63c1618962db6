"""The price book against real published prices, checked to the nano-unit by hand.

Every expected figure is worked out in the comment next to it from the per-MTok prices
(micro-dollars per token = $/MTok, so "2,000 x 2.50" below is 5,000 micro-USD = 5,000,000 nano).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pytest
import yaml
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from tokenworks.config import loads
from tokenworks.metering.extract import usage_from_openai
from tokenworks.metering.usage import Usage
from tokenworks.pricing.quote import Pricer, PricingConfigError, PricingError
from tokenworks.pricing.spec import CostSpec, PricingSpec

PRODUCERS = """
producers:
  - {name: openai, base_url: "https://api.openai.com/v1"}
  - {name: anthropic, base_url: "https://api.anthropic.com/v1"}
  - {name: google, base_url: "https://generativelanguage.googleapis.com/v1beta"}
  - {name: deepseek, base_url: "https://api.deepseek.com"}
  - {name: bailian, base_url: "https://dashscope.aliyuncs.com/compatible-mode/v1", currency: CNY}
  - {name: bigmodel, base_url: "https://open.bigmodel.cn/api/paas/v4", currency: CNY}
"""

MODELS = """
models:
  - {name: gpt-4o, deployments: [{producer: openai, model: gpt-4o}]}
  - {name: sonnet, deployments: [{producer: anthropic, model: claude-sonnet-4-5}]}
  - {name: gemini-pro, deployments: [{producer: google, model: gemini-2.5-pro}]}
  - {name: ds-pro, deployments: [{producer: deepseek, model: deepseek-v4-pro}]}
  - name: glm-4.5
    deployments:
      # Alibaba Model Studio, help.aliyun.com/zh/model-studio/glm-4-5 (CNY per 1k tokens):
      # input 0-32K 0.003 / output 0.014; 32K-96K 0.004 / 0.016.
      - producer: bailian
        model: glm-4.5
        cost:
          input_per_mtok: "3"
          output_per_mtok: "14"
          tiers: [{input_over_tokens: 32000, input_per_mtok: "4", output_per_mtok: "16"}]
  - name: glm-4.5-air
    deployments:
      # open.bigmodel.cn GLM-4.5-Air (CNY/MTok), tiered by input AND output length:
      # [0,32k) in & [0,0.2k) out: 0.8 / 2 (genai-prices' zhipuai entry: $0.11 / $0.276 at 7.25);
      # [0,32k) in & [0.2k,+) out: 0.8 / 6; [32k,128k) in: 1.2 / 8 (same as Alibaba's resale).
      - producer: bigmodel
        model: glm-4.5-air
        cost:
          input_per_mtok: "0.8"
          output_per_mtok: "2"
          tiers:
            - {output_over_tokens: 199, output_per_mtok: "6"}
            - {input_over_tokens: 31999, input_per_mtok: "1.2", output_per_mtok: "8"}
  - name: glm-5.3
    deployments:
      # Zhipu list price in CNY per MTok: 8 input, 2 cached input, 28 output.
      - producer: bigmodel
        model: glm-5.3
        cost: {input_per_mtok: "8", cached_input_per_mtok: "2", output_per_mtok: "28"}
"""

PRICING = """
currency: USD
exchange_rates: {CNY: "7.25"}
"""

WED_NOON_UTC = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)  # 20:00 in Beijing: off-peak


def build(models: str = MODELS, pricing: str = PRICING) -> Pricer:
    config = loads(PRODUCERS + models, check_prices=False)
    spec = msgspec.convert(yaml.safe_load(pricing) or {}, PricingSpec)
    return Pricer.from_parts(spec, config.producers, config.models)


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    return build()


def cost(pricer: Pricer, model: str, usage: Usage, at: datetime = WED_NOON_UTC, **kw) -> int:
    deployment = {
        "gpt-4o": ("openai", "gpt-4o"),
        "sonnet": ("anthropic", "claude-sonnet-4-5"),
        "gemini-pro": ("google", "gemini-2.5-pro"),
        "ds-pro": ("deepseek", "deepseek-v4-pro"),
        "glm-4.5": ("bailian", "glm-4.5"),
        "glm-4.5-air": ("bigmodel", "glm-4.5-air"),
        "glm-5.3": ("bigmodel", "glm-5.3"),
    }[model]
    return pricer.quote(model, *deployment, usage, at=at, **kw).cost_nano


def test_openai_cached_input(pricer: Pricer) -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output.
    usage = Usage(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=500)
    # 2,000 x 2.50 + 8,000 x 1.25 + 500 x 10 = 5,000 + 10,000 + 5,000 = 20,000 micro-USD
    assert cost(pricer, "gpt-4o", usage) == 20_000_000


def test_openai_service_tiers_and_batch(pricer: Pricer) -> None:
    usage = Usage(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=500)
    # Priority (from 2026-10-12): 4.25 / 2.125 / 17:
    # 2,000 x 4.25 + 8,000 x 2.125 + 500 x 17 = 8,500 + 17,000 + 8,500 = 34,000 micro-USD
    assert cost(pricer, "gpt-4o", usage, service_tier="priority") == 34_000_000
    # Before the priority rates were published the standard rate applies.
    early = datetime(2026, 10, 1, 12, tzinfo=UTC)
    assert cost(pricer, "gpt-4o", usage, early, service_tier="priority") == 20_000_000
    # Batch: 1.25 input / 5 output; no batch cached rate, so cached keeps 1.25:
    # 2,000 x 1.25 + 8,000 x 1.25 + 500 x 5 = 2,500 + 10,000 + 2,500 = 15,000 micro-USD
    assert cost(pricer, "gpt-4o", usage, batch=True) == 15_000_000
    # gpt-4o has no flex price: flex is billed at the standard rate.
    assert cost(pricer, "gpt-4o", usage, service_tier="flex") == 20_000_000


@dataclass(slots=True)
class UsageWith1h(Usage):
    """Usage plus the field we asked metering to add (1-hour cache writes, a subset)."""

    cache_write_1h_tokens: int = 0


def test_anthropic_cache_writes(pricer: Pricer) -> None:
    # claude-sonnet-4-5: 3 input, 0.30 cache read, 3.75 5-min write, 6 1-hour write, 15 output.
    usage = Usage(
        input_tokens=150_000, cached_input_tokens=100_000, cache_write_tokens=20_000,
        output_tokens=2_000,
    )  # fmt: skip
    # 30,000 x 3 + 100,000 x 0.30 + 20,000 x 3.75 + 2,000 x 15
    # = 90,000 + 30,000 + 75,000 + 30,000 = 225,000 micro-USD
    assert cost(pricer, "sonnet", usage) == 225_000_000
    # All 100k written for an hour: 100,000 x 6 = 600,000 micro-USD; for 5 min 375,000.
    hour = UsageWith1h(
        input_tokens=100_000, cache_write_tokens=100_000, cache_write_1h_tokens=100_000
    )
    assert cost(pricer, "sonnet", hour) == 600_000_000
    five = Usage(input_tokens=100_000, cache_write_tokens=100_000)
    assert cost(pricer, "sonnet", five) == 375_000_000
    # Past 200k input the whole request reprices: 6 / 0.6 / 7.5 / 12 / 22.5.
    big = Usage(input_tokens=250_000, cached_input_tokens=200_000, output_tokens=1_000)
    # 50,000 x 6 + 200,000 x 0.6 + 1,000 x 22.5 = 300,000 + 120,000 + 22,500 = 442,500
    assert cost(pricer, "sonnet", big) == 442_500_000


def test_gemini_cliff_at_200k(pricer: Pricer) -> None:
    # gemini-2.5-pro: 1.25 / 10 up to 200k input, 2.50 / 15 for the whole request past it.
    at_200k = Usage(input_tokens=200_000, output_tokens=1_000)
    # 200,000 x 1.25 + 1,000 x 10 = 250,000 + 10,000 = 260,000 micro-USD
    assert cost(pricer, "gemini-pro", at_200k) == 260_000_000
    past = Usage(input_tokens=200_001, output_tokens=1_000)
    # 200,001 x 2.5 + 1,000 x 15 = 500,002.5 + 15,000 = 515,002.5 micro-USD
    assert cost(pricer, "gemini-pro", past) == 515_002_500
    # Cached tokens count toward the threshold: 200,001 with 150,001 cached, cache read 0.25.
    cached = Usage(input_tokens=200_001, cached_input_tokens=150_001, output_tokens=0)
    # 50,000 x 2.5 + 150,001 x 0.25 = 125,000 + 37,500.25 micro-USD -> 162,500,250 nano
    assert cost(pricer, "gemini-pro", cached) == 162_500_250


def test_deepseek_peak_and_off_peak(pricer: Pricer) -> None:
    # deepseek-v4-pro from 2026-08-17: off-peak 0.66 / 0.022 cached / 1.98;
    # peak (09:00-12:00 and 14:00-18:00 Beijing, weekdays) 1.32 / 0.044 / 3.96.
    usage = Usage(input_tokens=100_000, cached_input_tokens=60_000, output_tokens=2_000)
    # off-peak: 40,000 x 0.66 + 60,000 x 0.022 + 2,000 x 1.98 = 26,400 + 1,320 + 3,960 = 31,680
    off_peak, peak = 31_680_000, 63_360_000
    wed = datetime(2026, 11, 18, tzinfo=UTC)
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=2)) == peak  # 10:00 Beijing
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=12)) == off_peak  # 20:00 Beijing
    # The window switches exactly at its edges: [01:00, 04:00) UTC.
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=0, minute=59, second=59)) == off_peak
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=1)) == peak
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=3, minute=59, second=59)) == peak
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=4)) == off_peak
    assert cost(pricer, "ds-pro", usage, wed.replace(hour=6)) == peak  # 14:00 Beijing


def test_deepseek_weekend_is_off_peak_our_fix(pricer: Pricer) -> None:
    """genai-prices bills Saturday 10:00 Beijing at peak (its own comment says it cannot express
    weekends); our reader restricts the peak windows to Beijing weekdays."""
    usage = Usage(input_tokens=100_000, cached_input_tokens=60_000, output_tokens=2_000)
    saturday_10_beijing = datetime(2026, 11, 21, 2, tzinfo=UTC)
    dataset = calc_price(
        GenaiUsage(input_tokens=100_000, cache_read_tokens=60_000, output_tokens=2_000),
        "deepseek-v4-pro",
        provider_id="deepseek",
        genai_request_timestamp=saturday_10_beijing,
    ).total_price
    assert str(dataset) == "0.06336"  # the dataset's peak price
    assert cost(pricer, "ds-pro", usage, saturday_10_beijing) == 31_680_000
    # Monday 01:00 UTC is 09:00 Beijing: peak again.
    assert cost(pricer, "ds-pro", usage, datetime(2026, 11, 23, 1, tzinfo=UTC)) == 63_360_000
    # Before V4 peak pricing began (2026-08-17) there was no peak: flat 0.435/0.003625/0.87.
    before = datetime(2026, 8, 10, 2, tzinfo=UTC)
    # 40,000 x 0.435 + 60,000 x 0.003625 + 2,000 x 0.87 = 17,400 + 217.5 + 1,740 = 19,357.5
    assert cost(pricer, "ds-pro", usage, before) == 19_357_500


def test_deepseek_native_cache_hit_field_our_fix(pricer: Pricer) -> None:
    """A DeepSeek body with only `prompt_cache_hit_tokens`: genai-prices' extractor misses it."""
    from genai_prices import extract_usage

    body = {
        "model": "deepseek-v4-pro",
        "usage": {
            "prompt_tokens": 100_000, "completion_tokens": 2_000,
            "prompt_cache_hit_tokens": 60_000, "prompt_cache_miss_tokens": 40_000,
        },
    }  # fmt: skip
    theirs = extract_usage(body, provider_id="deepseek", api_flavor="chat")
    assert theirs.usage.cache_read_tokens == 0  # the dataset's reader ignores the field
    ours = usage_from_openai(body["usage"])
    assert ours.cached_input_tokens == 60_000
    assert cost(pricer, "ds-pro", ours) == 31_680_000


def test_glm_input_length_tier_in_cny(pricer: Pricer) -> None:
    # Alibaba's glm-4.5, CNY: 3 / 14 up to 32k input, 4 / 16 past it; 1 USD = 7.25 CNY.
    small = Usage(input_tokens=32_000, output_tokens=1_000)
    # 32,000 x 3 + 1,000 x 14 = 96,000 + 14,000 = 110,000 micro-CNY = 0.11 CNY
    # 0.11 / 7.25 USD = 0.0151724137931... -> 15,172,413.79 nano -> 15,172,414
    assert cost(pricer, "glm-4.5", small) == 15_172_414
    big = Usage(input_tokens=32_001, output_tokens=1_000)
    # 32,001 x 4 + 1,000 x 16 = 128,004 + 16,000 = 144,004 micro-CNY
    # 0.144004 / 7.25 = 0.019862620689655... -> 19,862,620.69 nano -> 19,862,621
    assert cost(pricer, "glm-4.5", big) == 19_862_621


def test_glm_output_length_tier(pricer: Pricer) -> None:
    # GLM-4.5-Air (CNY): output under 200 tokens 0.8 / 2; from 200 output 0.8 / 6.
    short = Usage(input_tokens=1_000, output_tokens=199)
    # 1,000 x 0.8 + 199 x 2 = 800 + 398 = 1,198 micro-CNY; / 7.25 = 165.2413793 micro-USD
    assert cost(pricer, "glm-4.5-air", short) == 165_241
    long = Usage(input_tokens=1_000, output_tokens=200)
    # 1,000 x 0.8 + 200 x 6 = 800 + 1,200 = 2,000 micro-CNY; / 7.25 = 275.862068966 micro-USD
    assert cost(pricer, "glm-4.5-air", long) == 275_862
    # From 32k input: 1.2 / 8, whatever the output length.
    # 32,000 x 1.2 + 100 x 8 = 38,400 + 800 = 39,200 micro-CNY; / 7.25 = 5,406.8965517 micro-USD
    assert cost(pricer, "glm-4.5-air", Usage(input_tokens=32_000, output_tokens=100)) == 5_406_897


def test_cny_producer_billed_into_usd_ledger(pricer: Pricer) -> None:
    # GLM-5.3: 8 CNY input, 2 CNY cached, 28 CNY output per MTok; 1 USD = 7.25 CNY.
    usage = Usage(input_tokens=100_000, cached_input_tokens=20_000, output_tokens=10_000)
    # 80,000 x 8 + 20,000 x 2 + 10,000 x 28 = 640,000 + 40,000 + 280,000 = 960,000 micro-CNY
    # = 0.96 CNY = 0.96 / 7.25 USD = 0.132413793103... -> 132,413,793 nano
    assert cost(pricer, "glm-5.3", usage) == 132_413_793


def test_cny_ledger() -> None:
    """A CNY ledger with a USD producer: 1 CNY = 1/7.25 USD, so $1 is 7.25 CNY."""
    pricer = build(MODELS, "currency: CNY\nexchange_rates: {USD: '0.137931034482'}")
    usage = Usage(input_tokens=1_000_000)
    # gpt-4o: 1M input = $2.50; 2.5 / 0.137931034482 CNY = 18.12500000036... -> nano 18,125,000,000
    q = pricer.quote("gpt-4o", "openai", "gpt-4o", usage, at=WED_NOON_UTC)
    assert q.cost_nano == 18_125_000_000 and q.currency == "CNY"
    # GLM-5.3 is in the ledger currency already: 1M input = 8 CNY exactly.
    q = pricer.quote("glm-5.3", "bigmodel", "glm-5.3", usage, at=WED_NOON_UTC)
    assert q.cost_nano == 8_000_000_000


def test_reasoning_priced_apart() -> None:
    # Qwen-plus thinking output: 1.2 non-thinking output vs 4.0 reasoning (Alibaba, litellm JSON).
    models = """
models:
  - name: qwen-plus
    deployments:
      - producer: bailian
        model: qwen-plus
        cost: {input_per_mtok: "0.4", output_per_mtok: "1.2", reasoning_per_mtok: "4", currency: USD}
"""
    pricer = build(models)
    usage = Usage(input_tokens=1_000, output_tokens=3_000, reasoning_tokens=2_000)
    # 1,000 x 0.4 + 1,000 x 1.2 + 2,000 x 4 = 400 + 1,200 + 8,000 = 9,600 micro-USD
    q = pricer.quote("qwen-plus", "bailian", "qwen-plus", usage, at=WED_NOON_UTC)
    assert q.cost_nano == 9_600_000


def test_override_with_windows_tiers_and_batch() -> None:
    # DeepSeek V3-era list: 0.27 / 0.07 cached / 1.10; off-peak UTC 16:30-00:30 at half price.
    models = """
models:
  - name: chat
    deployments:
      - producer: deepseek
        model: deepseek-chat
        cost:
          input_per_mtok: "0.27"
          cached_input_per_mtok: "0.07"
          output_per_mtok: "1.10"
          windows:
            - {start: "16:30", end: "00:30", input_per_mtok: "0.135",
               cached_input_per_mtok: "0.035", output_per_mtok: "0.55"}
          service_tiers: {priority: {input_per_mtok: "0.54", output_per_mtok: "2.2"}}
          batch: {input_per_mtok: "0.135"}
"""
    pricer = build(models)
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=500_000, output_tokens=1_000_000)
    day = datetime(2026, 11, 18, tzinfo=UTC)

    def c(at: datetime, **kw) -> int:
        return pricer.quote("chat", "deepseek", "deepseek-chat", usage, at=at, **kw).cost_nano

    # 500,000 x 0.27 + 500,000 x 0.07 + 1,000,000 x 1.10 = 135,000 + 35,000 + 1,100,000
    standard = 1_270_000_000
    # 500,000 x 0.135 + 500,000 x 0.035 + 1,000,000 x 0.55 = 67,500 + 17,500 + 550,000
    off_peak = 635_000_000
    assert c(day.replace(hour=12)) == standard
    assert c(day.replace(hour=16, minute=29)) == standard
    assert c(day.replace(hour=16, minute=30)) == off_peak
    assert c(day.replace(hour=0, minute=29)) == off_peak
    assert c(day.replace(hour=0, minute=30)) == standard
    # Priority: 500,000 x 0.54 + 500,000 x 0.07 + 1,000,000 x 2.2 = 270,000 + 35,000 + 2,200,000
    assert c(day.replace(hour=12), service_tier="priority") == 2_505_000_000
    # At night the tier's rates win, the window still sets the rest: cached 0.035 -> 17,500.
    assert c(day.replace(hour=20), service_tier="priority") == 2_487_500_000
    # Batch: 500,000 x 0.135 + 35,000 + 1,100,000 = 1,202,500 micro-USD
    assert c(day.replace(hour=12), batch=True) == 1_202_500_000


def test_rounding_half_up_once() -> None:
    models = """
models:
  - name: tiny
    deployments:
      - producer: deepseek
        model: tiny
        cost: {input_per_mtok: "0.0005", output_per_mtok: "0.0015"}
"""
    pricer = build(models)

    def c(i: int, o: int) -> int:
        return pricer.quote("tiny", "deepseek", "tiny", Usage(input_tokens=i, output_tokens=o),
                            at=WED_NOON_UTC).cost_nano  # fmt: skip

    assert c(1, 0) == 1  # 0.5 nano -> 1 (half up)
    assert c(3, 0) == 2  # 1.5 -> 2
    assert c(0, 1) == 2  # 1.5 -> 2
    # Rounded once: 1 in + 1 out = 0.5 + 1.5 = 2.0 nano, not round(0.5) + round(1.5) = 3.
    assert c(1, 1) == 2


def test_dataset_agrees_where_no_fix_applies(pricer: Pricer) -> None:
    """Our integer reader reproduces genai-prices' Decimal answers for untouched models."""
    cases = [("gpt-4o", "openai", "gpt-4o"), ("sonnet", "anthropic", "claude-sonnet-4-5"),
             ("gemini-pro", "google", "gemini-2.5-pro")]  # fmt: skip
    for model, provider, ref in cases:
        for inp, cached, out in [(1, 0, 1), (123_457, 23_456, 7_891), (250_000, 1_000, 3_000)]:
            theirs = calc_price(
                GenaiUsage(input_tokens=inp, cache_read_tokens=cached, output_tokens=out),
                ref, provider_id=provider, genai_request_timestamp=WED_NOON_UTC,
            ).total_price  # fmt: skip
            usage = Usage(input_tokens=inp, cached_input_tokens=cached, output_tokens=out)
            ours = cost(pricer, model, usage)
            assert ours == int((theirs * 10**9).to_integral_value(rounding="ROUND_HALF_UP"))


def test_unknown_cost_is_a_config_error() -> None:
    models = """
models:
  - name: local
    deployments:
      - {producer: openai, model: gpt-4o}
      - {producer: bailian, model: qwen-max}
"""
    with pytest.raises(PricingConfigError) as err:
        build(models)
    message = str(err.value)
    assert "model 'local' deployment 1 (producer 'bailian', upstream model 'qwen-max')" in message
    assert "input_per_mtok" in message


def test_missing_exchange_rate_is_a_config_error() -> None:
    with pytest.raises(PricingConfigError, match=r"exchange_rates\.CNY"):
        build(MODELS, "currency: USD")


def test_unknown_deployment_at_quote_time(pricer: Pricer) -> None:
    with pytest.raises(PricingError, match="no price for model"):
        pricer.quote("gpt-4o", "openai", "gpt-5", Usage(), at=WED_NOON_UTC)
    with pytest.raises(PricingError, match="timezone-aware"):
        pricer.quote("gpt-4o", "openai", "gpt-4o", Usage(), at=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"input_per_mtok": "1"}, "both input_per_mtok and output_per_mtok"),
        ({"input_per_mtok": 0.27, "output_per_mtok": "1"}, "Expected `str"),
        ({"input_per_mtok": "1e-3", "output_per_mtok": "1"}, "plain decimal"),
        ({"input_per_mtok": "-1", "output_per_mtok": "1"}, "negative"),
        ({"input_per_mtok": "1", "output_per_mtok": "1", "provider": "x"}, "cannot go with"),
        ({"tiers": [{"input_over_tokens": 5}]}, "need explicit base rates"),
        ({"input_per_mtok": "1", "output_per_mtok": "1", "tiers": [{"input_per_mtok": "2"}]},
         "input_over_tokens or output_over_tokens"),
        ({"input_per_mtok": "1", "output_per_mtok": "1",
          "windows": [{"start": "9:00", "end": "12:00"}]}, "HH:MM"),
        ({"input_per_mtok": "1", "output_per_mtok": "1",
          "windows": [{"start": "09:00", "end": "12:00", "tz": "Mars/Base"}]}, "time zone"),
    ],
)  # fmt: skip
def test_cost_spec_rejects(raw: dict, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, CostSpec)


def test_lookup_by_explicit_provider_and_model_ref() -> None:
    """A self-hosted name mapped to a dataset entry: cost: {provider, model_ref}."""
    models = """
models:
  - name: v4
    deployments:
      - producer: bailian
        model: deepseek-ai/DeepSeek-V4-Pro
        cost: {provider: deepseek, model_ref: deepseek-v4-pro}
"""
    pricer = build(models)
    usage = Usage(input_tokens=1_000_000)
    q = pricer.quote("v4", "bailian", "deepseek-ai/DeepSeek-V4-Pro", usage, at=WED_NOON_UTC)
    assert q.cost_nano == 660_000_000  # 1M x 0.66 off-peak, in USD (the dataset's currency)
