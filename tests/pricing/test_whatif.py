"""What-if: re-pricing recorded usage under scenario files."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
import yaml

from tokenworks.config import loads
from tokenworks.metering.usage import Usage, UsageRecord
from tokenworks.pricing.quote import Pricer, PricingError
from tokenworks.pricing.spec import PricingSpec
from tokenworks.pricing.whatif import ScenarioError, format_table, loads_scenario, reprice

CONFIG = """
producers:
  - {name: openai, base_url: "https://api.openai.com/v1"}
  - {name: deepseek, base_url: "https://api.deepseek.com"}
models:
  - {name: chat-fast, deployments: [{producer: openai, model: gpt-5}]}
  - {name: reasoner, deployments: [{producer: openai, model: o3}]}
"""

# Wednesday 2026-11-18 02:00 UTC = 10:00 in Beijing (DeepSeek peak).
TS_MS = int(datetime(2026, 11, 18, 2, tzinfo=UTC).timestamp()) * 1000


def record(rid: str, account: str, model: str, upstream: str | None, usage: Usage) -> UsageRecord:
    return UsageRecord(
        request_id=rid, ts_ms=TS_MS, key_id=None, account_id=account, public_model=model,
        producer="openai" if upstream else None, upstream_model=upstream,
        endpoint="/v1/chat/completions", status=200 if upstream else 402, usage=usage,
        latency_ms=1.0, ttft_ms=None, streamed=False,
    )  # fmt: skip


RECORDS = [
    # gpt-5 1.25 / 0.125 / 10: 2,000 x 1.25 + 8,000 x 0.125 + 1,000 x 10 = 13,500 micro-USD
    record("r1", "acct-a", "chat-fast", "gpt-5",
           Usage(input_tokens=10_000, cached_input_tokens=8_000, output_tokens=1_000)),
    # o3 2 / 8: 100,000 x 2 + 20,000 x 8 = 360,000 micro-USD
    record("r2", "acct-a", "reasoner", "o3",
           Usage(input_tokens=100_000, output_tokens=20_000, reasoning_tokens=15_000)),
    # gpt-5: 2,000 x 1.25 + 500 x 10 = 7,500 micro-USD
    record("r3", "acct-b", "chat-fast", "gpt-5", Usage(input_tokens=2_000, output_tokens=500)),
    record("r4", "acct-b", "chat-fast", None, Usage()),  # refused before dispatch
]  # fmt: skip


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    config = loads(CONFIG, check_prices=False)
    pricing = msgspec.convert(yaml.safe_load("tariffs: {default: {markup: '0.25'}}"), PricingSpec)
    return Pricer.from_parts(pricing, config.producers, config.models)


def rows(result) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    return {
        (r.account_id, r.public_model): (
            r.base_cost_nano, r.new_cost_nano, r.base_price_nano, r.new_price_nano,
        )
        for r in result.rows
    }  # fmt: skip


def test_every_provider_plus_30_percent(pricer: Pricer) -> None:
    scenario = loads_scenario(
        """
name: providers +30%
changes:
  - {kind: scale_cost, factor: "1.3"}
"""
    )
    result = reprice(RECORDS, pricer, scenario)
    assert rows(result) == {
        ("acct-a", "chat-fast"): (13_500_000, 17_550_000, 16_875_000, 21_937_500),
        ("acct-a", "reasoner"): (360_000_000, 468_000_000, 450_000_000, 585_000_000),
        ("acct-b", "chat-fast"): (7_500_000, 9_750_000, 9_375_000, 12_187_500),
    }
    total = result.total
    assert (total.base_cost_nano, total.new_cost_nano) == (381_000_000, 495_300_000)
    assert (total.base_price_nano, total.new_price_nano) == (476_250_000, 619_125_000)
    assert total.requests == 3
    assert result.skipped == [("r4", "not dispatched to a producer")]
    # Totals are the sum of the rows.
    assert total.delta_price_nano == sum(r.delta_price_nano for r in result.rows)


def test_chat_fast_moved_to_deepseek_off_peak(pricer: Pricer) -> None:
    scenario = loads_scenario(
        """
name: chat-fast on DeepSeek at night
changes:
  - kind: move
    model: chat-fast
    to_producer: deepseek
    to_model: deepseek-v4-flash
    at_local_time: "02:00"
    tz: Asia/Shanghai
"""
    )
    result = reprice(RECORDS, pricer, scenario)
    got = rows(result)
    # v4-flash off-peak 0.15 / 0.003 cached / 0.6:
    # r1: 2,000 x 0.15 + 8,000 x 0.003 + 1,000 x 0.6 = 300 + 24 + 600 = 924 micro-USD
    assert got[("acct-a", "chat-fast")] == (13_500_000, 924_000, 16_875_000, 1_155_000)
    # r3: 2,000 x 0.15 + 500 x 0.6 = 600 micro-USD
    assert got[("acct-b", "chat-fast")] == (7_500_000, 600_000, 9_375_000, 750_000)
    assert got[("acct-a", "reasoner")][0] == got[("acct-a", "reasoner")][1]  # untouched
    # Without re-timing, 10:00 Beijing is peak: 0.3 / 0.006 / 1.2 -> r1 = 1,848 micro-USD.
    peak = loads_scenario(
        "changes: [{kind: move, model: chat-fast, to_producer: deepseek,"
        " to_model: deepseek-v4-flash}]"
    )
    assert rows(reprice(RECORDS, pricer, peak))[("acct-a", "chat-fast")][1] == 1_848_000


def test_reasoning_model_swapped_for_a_cheaper_one(pricer: Pricer) -> None:
    scenario = loads_scenario(
        """
name: o3 -> o4-mini
changes:
  - {kind: move, upstream_model: o3, to_producer: openai, to_model: o4-mini}
"""
    )
    result = reprice(RECORDS, pricer, scenario)
    # o4-mini 1.1 / 4.4: 100,000 x 1.1 + 20,000 x 4.4 = 110,000 + 88,000 = 198,000 micro-USD
    assert rows(result)[("acct-a", "reasoner")] == (
        360_000_000, 198_000_000, 450_000_000, 247_500_000,
    )  # fmt: skip
    table = format_table(result)
    assert "scenario: o3 -> o4-mini  (amounts in USD)" in table
    lines = table.splitlines()
    reasoner = next(line for line in lines if "reasoner" in line)
    assert reasoner.split() == [
        "acct-a", "reasoner", "1", "0.36", "0.198", "-0.162", "0.45", "0.2475", "-0.2025", "-45.0%",
    ]  # fmt: skip
    total = lines[-2]
    assert total.split()[0] == "TOTAL" and "-0.2025" in total
    assert lines[-1].startswith("skipped 1 record(s)")


def test_set_cost_and_set_tariff(pricer: Pricer) -> None:
    scenario = loads_scenario(
        """
changes:
  - kind: set_cost
    producer: openai
    upstream_model: gpt-5
    cost: {input_per_mtok: "1", output_per_mtok: "8"}
  - kind: set_tariff
    name: default
    tariff: {markup: "0.5"}
"""
    )
    got = rows(reprice(RECORDS, pricer, scenario))
    # r3: 2,000 x 1 + 500 x 8 = 6,000 micro-USD; price x 1.5 = 9,000
    assert got[("acct-b", "chat-fast")] == (7_500_000, 6_000_000, 9_375_000, 9_000_000)


def test_move_to_unpriced_model_fails_clearly(pricer: Pricer) -> None:
    scenario = loads_scenario(
        "changes: [{kind: move, model: chat-fast, to_producer: deepseek, to_model: nope-1}]"
    )
    with pytest.raises(PricingError, match="deepseek/nope-1"):
        reprice(RECORDS, pricer, scenario)
    scenario = loads_scenario(
        "changes: [{kind: move, model: chat-fast, to_producer: nobody, to_model: gpt-5}]"
    )
    with pytest.raises(PricingError, match="unknown producer 'nobody'"):
        reprice(RECORDS, pricer, scenario)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("changes: [{kind: discount}]", "Invalid value 'discount'"),
        ("changes: [{kind: move, to_producer: x, to_model: y}]", "needs model, producer"),
        ("changes: [{kind: scale_cost, factor: 1.3}]", "Expected `str"),
        ("changes: [{kind: scale_cost, factor: '1.3', producr: x}]", "unknown field"),
        ("changes: [", "invalid YAML"),
    ],
)
def test_bad_scenarios(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        loads_scenario(text)


def test_docs_examples_parse() -> None:
    """The config and scenario examples in docs/pricing.md are valid."""
    from pathlib import Path

    from tokenworks.pricing.spec import CostSpec

    text = (Path(__file__).parents[2] / "docs" / "pricing.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    config, scenario = yaml.safe_load(blocks[0]), blocks[1]
    msgspec.convert(config["pricing"], PricingSpec)
    for model in config["models"]:
        for deployment in model["deployments"]:
            if "cost" in deployment:
                msgspec.convert(deployment["cost"], CostSpec)
    assert len(loads_scenario(scenario).changes) == 5
