"""`Pricer.unit_prices`: what `provider.max_price` is compared with, exact."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

from tokenworks.config import loads
from tokenworks.pricing.quote import Pricer

CONFIG = """
producers:
  - {name: a, base_url: "http://127.0.0.1:1/v1"}
models:
  - name: m
    deployments:
      - producer: a
        model: up
        cost:
          input_per_mtok: "1.00"
          output_per_mtok: "4.00"
          tiers: [{input_over_tokens: 200000, input_per_mtok: "2.00", output_per_mtok: "6.00"}]
  - name: f
    deployments:
      - {producer: a, model: up, cost: {input_per_mtok: "1.00", output_per_mtok: "4.00"}}
pricing:
  tariffs:
    default:
      markup: "0.25"
      service_tiers: {priority: "2"}
      time_of_use: [{start: "00:00", end: "06:00", multiplier: "0.8"}]
      fixed:
        f: {input_per_mtok: "0.50", output_per_mtok: "9.00"}
"""

DAY = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)


def test_markup_tier_time_of_use_and_size_tier() -> None:
    pricer = Pricer.from_config(loads(CONFIG))
    assert pricer.unit_prices("m", "a", "up", 1000, 100, at=DAY) == (
        Fraction(5, 4),
        Fraction(5),
    )
    assert pricer.unit_prices("m", "a", "up", 1000, 100, at=DAY, service_tier="priority") == (
        Fraction(5, 2),
        Fraction(10),
    )
    assert pricer.unit_prices("m", "a", "up", 1000, 100, at=NIGHT) == (Fraction(1), Fraction(4))
    # Past 200k input tokens the whole request is on the dearer cliff tier.
    assert pricer.unit_prices("m", "a", "up", 300_000, 100, at=DAY) == (
        Fraction(5, 2),
        Fraction(15, 2),
    )


def test_a_fixed_price_is_floored_at_cost() -> None:
    pricer = Pricer.from_config(loads(CONFIG))
    # Fixed 0.50 input is below the 1.00 cost: floored (below_cost: refuse); output 9.00 kept.
    assert pricer.unit_prices("f", "a", "up", 1000, 100, at=DAY) == (Fraction(1), Fraction(9))
