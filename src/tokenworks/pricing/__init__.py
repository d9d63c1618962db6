"""Pricing: the price book (what producers charge), tariffs (what consumers pay), exact money.

Entry points: `Pricer.from_config(config)` once at startup, then `pricer.quote(...)`,
`pricer.worst_case(...)` and `pricer.list_price(...)` per request; `money.format_nano` and
`money.parse_amount` for amounts as decimal strings; `whatif.reprice` for scenarios.
"""

from tokenworks.money import format_nano, parse_amount
from tokenworks.pricing.quote import Pricer, PricingConfigError, PricingError, Quote

__all__ = ["Pricer", "PricingConfigError", "PricingError", "Quote", "format_nano", "parse_amount"]
