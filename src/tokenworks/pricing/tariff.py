"""Tariffs: what a consumer pays, as exact multipliers over cost or a fixed price per model.

Multipliers are kept as integer (numerator, denominator) pairs: multiplying a handful of ints per
request is exact and several times cheaper than `Fraction` arithmetic on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction

from tokenworks.money import parse_factor
from tokenworks.pricing.book import spec_rates, table_from_specs
from tokenworks.pricing.rates import RateTable
from tokenworks.pricing.spec import SERVICE_TIERS, TariffSpec
from tokenworks.pricing.windows import Window

Ratio = tuple[int, int]
ONE: Ratio = (1, 1)

# OpenAI's request values that mean "no particular tier".
_DEFAULT_ALIASES = frozenset({"auto"})
_STANDARD_ALIASES = frozenset({"default", "standard"})


class UnknownServiceTier(ValueError):
    """A request asked for a service tier its tariff does not sell."""


def _ratio(value: Fraction) -> Ratio:
    return value.numerator, value.denominator


@dataclass(frozen=True, slots=True)
class Tariff:
    """A compiled TariffSpec."""

    name: str
    markup: Ratio  # 1 + markup
    fixed: dict[str, RateTable]  # public model -> ledger-currency table
    tier_multipliers: dict[str, Ratio]
    default_tier: str
    time_of_use: tuple[tuple[Window, Ratio], ...] = field(default=())
    # Raise a price below the request's cost to that cost (the spec's `below_cost: refuse`).
    floor_at_cost: bool = True

    @classmethod
    def from_spec(cls, name: str, spec: TariffSpec) -> Tariff:
        tiers = {tier: ONE for tier in SERVICE_TIERS}
        tiers.update({t: _ratio(parse_factor(m)) for t, m in spec.service_tiers.items()})
        fixed = {
            model: table_from_specs(spec_rates(price), price.tiers)
            for model, price in spec.fixed.items()
        }
        time_of_use = tuple(
            (Window.parse(w.start, w.end, w.tz, w.days), _ratio(parse_factor(w.multiplier)))
            for w in spec.time_of_use
        )
        return cls(
            name=name,
            markup=_ratio(1 + parse_factor(spec.markup)),
            fixed=fixed,
            tier_multipliers=tiers,
            default_tier=spec.default_service_tier,
            time_of_use=time_of_use,
            floor_at_cost=spec.below_cost != "allow",
        )

    def service_tier(self, requested: str | None) -> str:
        """The tier a request is priced at: its own, or the tariff's default for None/'auto'."""
        if requested is None or requested in _DEFAULT_ALIASES:
            return self.default_tier
        if requested in _STANDARD_ALIASES:
            return "standard"
        if requested not in self.tier_multipliers:
            known = ", ".join(sorted(self.tier_multipliers))
            raise UnknownServiceTier(
                f"service_tier {requested!r} is not offered by tariff {self.name!r}"
                f" (offered: {known})"
            )
        return requested

    def multiplier(self, tier: str, at: datetime) -> Ratio:
        """Service-tier multiplier times the first matching time-of-use multiplier."""
        num, den = self.tier_multipliers[tier]
        for window, (w_num, w_den) in self.time_of_use:
            if window.contains(at):
                return num * w_num, den * w_den
        return num, den
