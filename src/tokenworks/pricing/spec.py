"""Config shapes for prices: what a producer charges and what a consumer pays.

These are the YAML shapes only. Each struct checks its own numbers in `__post_init__` so a bad
price fails at config load with the line that holds it; the pricing modules turn them into
integer tables (`book.py`, `tariff.py`). All prices are decimal strings, never YAML floats:
`"0.27"`, not `0.27`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from tokenworks.money import parse_factor, parse_rate

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SERVICE_TIERS = ("standard", "priority", "flex")
_TIME_RE = re.compile(r"([01][0-9]|2[0-4]):([0-5][0-9])")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")


def check_time(text: str) -> int:
    """'09:30' -> minutes after midnight; '24:00' is allowed as an end."""
    match = _TIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"time {text!r} must be HH:MM")
    minutes = int(match.group(1)) * 60 + int(match.group(2))
    if minutes > 24 * 60:
        raise ValueError(f"time {text!r} is past 24:00")
    return minutes


def check_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def check_currency(code: str) -> str:
    if not _CURRENCY_RE.fullmatch(code):
        raise ValueError(f"currency {code!r} must be a 3-letter ISO code like 'USD'")
    return code


def _check_days(days: list[str] | None) -> None:
    for day in days or ():
        if day not in DAY_NAMES:
            raise ValueError(f"day {day!r} must be one of {', '.join(DAY_NAMES)}")


class RatesSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prices per million tokens; a missing one falls back (see docs/pricing.md)."""

    input_per_mtok: str | None = None
    output_per_mtok: str | None = None
    cached_input_per_mtok: str | None = None
    # A 5-minute (or the only kind of) cache write.
    cache_write_per_mtok: str | None = None
    cache_write_1h_per_mtok: str | None = None
    # Reasoning (thinking) output when priced apart from output, as Qwen does.
    reasoning_per_mtok: str | None = None

    def __post_init__(self) -> None:
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                parse_rate(value)


_RATE_FIELDS = tuple(RatesSpec.__struct_fields__)


class TierSpec(RatesSpec, kw_only=True):
    """A cliff: a request past these thresholds is priced wholly at these rates.

    The thresholds are exclusive: `input_over_tokens: 200000` applies from 200,001 input tokens
    (cached and cache-write tokens count). Rates left out inherit the base rates.
    """

    input_over_tokens: int = 0
    output_over_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_over_tokens < 0 or self.output_over_tokens < 0:
            raise ValueError("tier thresholds must be >= 0 tokens")
        if self.input_over_tokens == 0 and self.output_over_tokens == 0:
            raise ValueError("a tier needs input_over_tokens or output_over_tokens")


class CostWindowSpec(RatesSpec, kw_only=True):
    """Rates that apply in a daily window of a time zone, e.g. DeepSeek's peak hours.

    `end` before `start` crosses midnight; `days` names the day a window starts on (all if unset).
    Rates left out inherit the base rates; `tiers` default to the base tiers.
    """

    start: str
    end: str
    tz: str = "UTC"
    days: list[str] | None = None
    tiers: list[TierSpec] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_time(self.start)
        check_time(self.end)
        check_zone(self.tz)
        _check_days(self.days)


class CostSpec(RatesSpec, kw_only=True):
    """What a deployment's producer charges, in the producer's currency per million tokens.

    Either give `input_per_mtok` and `output_per_mtok` (an override of the dataset), or neither
    (look the model up in genai-prices as `provider`/`model_ref`, by default the producer's
    provider and the deployment's upstream model name).
    """

    currency: str | None = None
    provider: str | None = None
    model_ref: str | None = None
    tiers: list[TierSpec] = msgspec.field(default_factory=list)
    windows: list[CostWindowSpec] = msgspec.field(default_factory=list)
    # Partial overrides per upstream service tier ("priority", "flex") and for batch processing.
    service_tiers: dict[str, RatesSpec] = msgspec.field(default_factory=dict)
    batch: RatesSpec | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.currency is not None:
            check_currency(self.currency)
        if (self.input_per_mtok is None) != (self.output_per_mtok is None):
            raise ValueError("give both input_per_mtok and output_per_mtok, or neither")
        if self.is_override and (self.provider or self.model_ref):
            raise ValueError(
                "provider/model_ref look a price up; they cannot go with explicit rates"
            )
        if not self.is_override and (
            self.tiers or self.windows or self.service_tiers or self.batch
        ):
            raise ValueError("tiers, windows, service_tiers and batch need explicit base rates")

    @property
    def is_override(self) -> bool:
        return self.input_per_mtok is not None


class FixedPriceSpec(RatesSpec, kw_only=True):
    """A fixed consumer price for one public model, in the ledger currency per million tokens."""

    tiers: list[TierSpec] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_per_mtok is None or self.output_per_mtok is None:
            raise ValueError("a fixed price needs input_per_mtok and output_per_mtok")


class TimeOfUseSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A price multiplier in a daily window, e.g. cheap night tokens: multiplier '0.5'."""

    start: str
    end: str
    multiplier: str
    tz: str = "UTC"
    days: list[str] | None = None

    def __post_init__(self) -> None:
        check_time(self.start)
        check_time(self.end)
        check_zone(self.tz)
        _check_days(self.days)
        parse_factor(self.multiplier)


class TariffSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a consumer pays: cost plus a markup, or a fixed price per public model.

    price = base x service-tier multiplier x time-of-use multiplier, where base is
    cost x (1 + markup), or the fixed price when the model has one.
    """

    markup: str = "0"
    fixed: dict[str, FixedPriceSpec] = msgspec.field(default_factory=dict)
    # Multiplier per service tier; "standard" is 1 unless set. Only listed tiers (and the three
    # standard names) may be requested.
    service_tiers: dict[str, str] = msgspec.field(default_factory=dict)
    default_service_tier: str = "standard"
    # First matching window wins; none matching means multiplier 1.
    time_of_use: list[TimeOfUseSpec] = msgspec.field(default_factory=list)
    # "refuse": a price is never below the request's cost: multipliers that would take a
    # markup price below cost are a config error, and a fixed price below a deployment's cost
    # is raised to that cost. "allow": sell below cost on purpose (a loss leader, staff use).
    below_cost: Literal["refuse", "allow"] = "refuse"

    def __post_init__(self) -> None:
        parse_factor(self.markup)
        for multiplier in self.service_tiers.values():
            parse_factor(multiplier)
        known = set(SERVICE_TIERS) | set(self.service_tiers)
        if self.default_service_tier not in known:
            raise ValueError(f"default_service_tier {self.default_service_tier!r} is not a tier")

    def lowest_markup(self) -> tuple[Fraction, str]:
        """The lowest price over cost this tariff's markup can reach (its cheapest tier in its
        cheapest time-of-use window), and how: below 1 it sells below cost."""
        tiers = dict.fromkeys(SERVICE_TIERS, Fraction(1))
        tiers.update({t: parse_factor(m) for t, m in self.service_tiers.items()})
        tier, tier_factor = min(tiers.items(), key=lambda item: item[1])
        window = min((parse_factor(w.multiplier) for w in self.time_of_use), default=Fraction(1))
        window = min(window, Fraction(1))
        lowest = (1 + parse_factor(self.markup)) * tier_factor * window
        how = (
            f"(1 + markup {self.markup}) x {tier} tier {float(tier_factor):g}"
            f" x time of use {float(window):g} = {float(lowest):g} of cost"
        )
        return lowest, how


class PricingSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The `pricing:` section: ledger currency, exchange rates, tariffs."""

    currency: str = "USD"
    # Units of that currency that one unit of the ledger currency buys: with a USD ledger,
    # `CNY: "7.25"` means 1 USD = 7.25 CNY, so 8 CNY is 8 / 7.25 USD.
    exchange_rates: dict[str, str] = msgspec.field(default_factory=dict)
    tariffs: dict[str, TariffSpec] = msgspec.field(
        default_factory=lambda: {"default": TariffSpec()}
    )
    default_tariff: str = "default"
    # Account id -> tariff name, for accounts that do not pay the default tariff.
    accounts: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_currency(self.currency)
        for code, rate in self.exchange_rates.items():
            check_currency(code)
            if parse_factor(rate) == 0:
                raise ValueError(f"exchange rate for {code} must be > 0")
        if self.default_tariff not in self.tariffs:
            raise ValueError(f"default_tariff {self.default_tariff!r} is not in tariffs")
        for account, tariff in self.accounts.items():
            if tariff not in self.tariffs:
                raise ValueError(f"account {account!r}: unknown tariff {tariff!r}")
        for name, spec in self.tariffs.items():
            # Prices are floored at cost at run time; a discount the floor would silently
            # cancel is a config mistake to show at load, unless the tariff opts in.
            lowest, how = spec.lowest_markup()
            if lowest < 1 and spec.below_cost != "allow":
                raise ValueError(
                    f"tariff {name!r} sells below cost: {how}; raise its multipliers, or set"
                    " `below_cost: allow` on it to sell below cost on purpose"
                )


# --- what-if scenario files (`tokenworks reprice --scenario FILE`) -------------------------


class _Match(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which recorded requests a change applies to; unset filters match everything."""

    model: str | None = None
    producer: str | None = None
    upstream_model: str | None = None


class ScaleCost(_Match, tag="scale_cost", tag_field="kind", kw_only=True):
    """Multiply the cost of matching deployments, e.g. factor '1.3' for "+30%"."""

    factor: str

    def __post_init__(self) -> None:
        parse_factor(self.factor)


class Move(_Match, tag="move", tag_field="kind", kw_only=True):
    """Serve matching requests from another deployment (same token counts).

    `at_local_time` re-times each moved request to that wall-clock time of its own day in `tz`,
    to ask "what if this ran off-peak".
    """

    to_producer: str
    to_model: str
    cost: CostSpec | None = None
    at_local_time: str | None = None
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if self.model is None and self.producer is None and self.upstream_model is None:
            raise ValueError("a move needs model, producer or upstream_model to match")
        if self.at_local_time is not None and check_time(self.at_local_time) >= 24 * 60:
            raise ValueError("at_local_time must be before 24:00")
        check_zone(self.tz)


class SetCost(msgspec.Struct, tag="set_cost", tag_field="kind", forbid_unknown_fields=True):
    """Replace what one producer charges for one upstream model."""

    producer: str
    upstream_model: str
    cost: CostSpec


class SetTariff(msgspec.Struct, tag="set_tariff", tag_field="kind", forbid_unknown_fields=True):
    """Replace (or add) a tariff."""

    name: str
    tariff: TariffSpec


Change = ScaleCost | Move | SetCost | SetTariff


class ScenarioSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A scenario file: changes applied in order to today's price book."""

    name: str = "scenario"
    description: str = ""
    changes: list[Change]
