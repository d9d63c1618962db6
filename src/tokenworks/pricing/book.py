"""The price book: cost schedules read from genai-prices, or from a deployment's `cost:` override.

genai-prices is the seed: it ships prices as Decimals per MTok inside the wheel, so reading it
needs no network. Its `calc_price` costs ~35-50 us per call, too slow and too dynamic for the
hot path, so we read each deployment's model once at startup into a `CostSchedule` of integer
tables and never call it per request. Its semantics are kept: cliff tiers on total input tokens
(`> start`), the last active conditional price wins, and variants override price keys (the first
active matching variant per key) and are ignored for models borrowed from a fallback provider.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from tokenworks.money import parse_rate, rate_from_decimal
from tokenworks.pricing import corrections
from tokenworks.pricing.rates import TOKEN_CLASSES, Rates, RateTable, Tier
from tokenworks.pricing.schedule import STANDARD, Card, CostSchedule, Epoch, Variant
from tokenworks.pricing.spec import CostSpec, RatesSpec, TierSpec
from tokenworks.pricing.windows import ALL_DAYS, Window

GENAI_PRICES_CURRENCY = "USD"

# genai-prices price keys we price, by our token class. Audio, image, web-search and per-request
# keys are not text-token classes; a gateway that serves them needs more classes.
_GENAI_KEYS = {
    "input_mtok": "input",
    "cache_read_mtok": "cached_input",
    "cache_write_mtok": "cache_write_5m",
    "cache_write_1h_mtok": "cache_write_1h",
    "output_mtok": "output",
    "output_reasoning_mtok": "reasoning",
}
_SPEC_FIELDS = {
    "input_per_mtok": "input",
    "cached_input_per_mtok": "cached_input",
    "cache_write_per_mtok": "cache_write_5m",
    "cache_write_1h_per_mtok": "cache_write_1h",
    "output_per_mtok": "output",
    "reasoning_per_mtok": "reasoning",
}
assert set(_GENAI_KEYS.values()) == set(TOKEN_CLASSES) == set(_SPEC_FIELDS.values())

Fields = dict[str, int | None]


class UnknownCost(LookupError):
    """No price is known for a model: neither an override nor a genai-prices match."""


# --- from a config override ----------------------------------------------------------------


def spec_rates(spec: RatesSpec) -> Fields:
    return {
        cls: (None if (text := getattr(spec, name)) is None else parse_rate(text))
        for name, cls in _SPEC_FIELDS.items()
    }


def _merge(*layers: Fields) -> Fields:
    merged: Fields = dict.fromkeys(TOKEN_CLASSES)
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return merged


def _resolve(fields: Fields) -> Rates:
    return Rates.resolve(**fields)


def table_from_specs(
    base: Fields, tiers: Iterable[TierSpec], patch: Fields | None = None
) -> RateTable:
    """A table whose tiers inherit `base`; `patch` (a variant's prices) wins at every level."""
    top = patch or {}
    rows = sorted(((t.input_over_tokens, t.output_over_tokens), spec_rates(t)) for t in tiers)
    keys = [k for k, _ in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two tiers have the same thresholds: {keys}")
    return RateTable(
        _resolve(_merge(base, top)),
        tuple(Tier(i, o, _resolve(_merge(base, fields, top))) for (i, o), fields in rows),
    )


def schedule_from_spec(spec: CostSpec, currency: str, source: str) -> CostSchedule:
    """A schedule from explicit rates: base + tiers, windows, service tiers and batch."""
    assert spec.is_override
    base = spec_rates(spec)

    def cards(patch: Fields | None) -> tuple[Card, ...]:
        out = [Card(table_from_specs(base, spec.tiers, patch))]
        for w in spec.windows:
            window_base = _merge(base, spec_rates(w))
            tiers = spec.tiers if w.tiers is None else w.tiers
            out.append(
                Card(
                    table_from_specs(window_base, tiers, patch),
                    window=Window.parse(w.start, w.end, w.tz, w.days),
                )
            )
        return tuple(out)

    batch = spec_rates(spec.batch) if spec.batch is not None else None
    variants: dict[Variant, tuple[Epoch, ...]] = {STANDARD: (Epoch(None, cards(None)),)}
    if batch is not None:
        variants[(None, True)] = (Epoch(None, cards(batch)),)
    for tier, patch_spec in spec.service_tiers.items():
        patch = spec_rates(patch_spec)
        variants[(tier, False)] = (Epoch(None, cards(patch)),)
        if batch is not None:
            variants[(tier, True)] = (Epoch(None, cards(_merge(patch, batch))),)
    return CostSchedule(currency, source, variants)


# --- from genai-prices ---------------------------------------------------------------------


def _genai_fields(model_price: Any, threshold: int | None) -> Fields:
    """Our classes' rates from a genai-prices ModelPrice, at a tier threshold (None: base)."""
    from genai_prices.types import TieredPrices

    fields: Fields = {}
    for key, cls in _GENAI_KEYS.items():
        value = model_price.__dict__.get(key)
        if value is None:
            fields[cls] = None
            continue
        if isinstance(value, TieredPrices):
            price: Decimal = value.base
            if threshold is not None:
                for tier in value.tiers:
                    if tier.start <= threshold:
                        price = tier.price
        else:
            price = value
        fields[cls] = rate_from_decimal(price)
    return fields


def table_from_genai(model_price: Any) -> RateTable:
    from genai_prices.types import TieredPrices

    starts = sorted(
        {
            tier.start
            for key in _GENAI_KEYS
            if isinstance(value := model_price.__dict__.get(key), TieredPrices)
            for tier in value.tiers
        }
    )
    assert all(s > 0 for s in starts), starts
    return RateTable(
        _resolve(_genai_fields(model_price, None)),
        tuple(Tier(s, 0, _resolve(_genai_fields(model_price, s))) for s in starts),
    )


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), UTC)


def _window_from_genai(constraint: Any) -> Window:
    def minutes(t: time) -> int:
        aware = t if t.tzinfo is not None else t.replace(tzinfo=UTC)
        utc = datetime.combine(date(1970, 1, 1), aware).astimezone(UTC)
        return utc.hour * 60 + utc.minute

    return Window(UTC, minutes(constraint.start_time), minutes(constraint.end_time), ALL_DAYS)


def _card_when(constraint: Any) -> tuple[datetime | None, Window | None]:
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    if constraint is None:
        return None, None
    if isinstance(constraint, StartDateConstraint):
        return _utc_midnight(constraint.start_date), None
    if isinstance(constraint, TimeOfDateConstraint):
        return None, _window_from_genai(constraint)
    raise ValueError(f"unsupported genai-prices constraint {type(constraint).__name__}")


@dataclass(frozen=True, slots=True)
class _GenaiVariant:
    when: Mapping[str, str]
    start: datetime | None
    prices: Any


def _context(variant: Variant) -> dict[str, str]:
    tier, batch = variant
    context: dict[str, str] = {}
    if tier is not None:
        context["service_tier"] = tier
    if batch:
        context["processing"] = "batch"
    return context


def schedule_from_genai(provider: Any, model: Any) -> CostSchedule:
    """Read one genai-prices model into a schedule (with our corrections applied)."""
    from genai_prices.types import ConditionalPrice, ModelPrice

    conditionals = (
        [ConditionalPrice(prices=model.prices)]
        if isinstance(model.prices, ModelPrice)
        else list(model.prices)
    )
    variants: list[_GenaiVariant] = []
    # genai-prices ignores variants when the model came from a fallback provider.
    if any(model is m for m in provider.models):
        for v in model.price_variants or ():
            start, window = _card_when(v.constraint)
            if window is not None:
                raise ValueError(f"{model.id}: a time-of-day variant is not supported")
            variants.append(_GenaiVariant(v.when, start, v.prices))

    def epoch(active: list[_GenaiVariant], start: datetime | None) -> Epoch:
        cards: list[Card] = []
        for conditional in conditionals:
            merged = dict(conditional.prices.__dict__)
            overrides: dict[str, Any] = {}
            for v in active:
                for key, price in v.prices.__dict__.items():
                    if price is not None:
                        overrides.setdefault(key, price)
            merged.update(overrides)
            effective_from, window = _card_when(conditional.constraint)
            cards.append(Card(table_from_genai(ModelPrice(**merged)), effective_from, window))
        return Epoch(start, tuple(corrections.apply(provider.id, model.id, cards)))

    tiers = {v.when["service_tier"] for v in variants if "service_tier" in v.when}
    tiers.discard("default")
    wanted: list[Variant] = [STANDARD, (None, True)]
    wanted += [(t, b) for t in sorted(tiers) for b in (False, True)]
    schedule: dict[Variant, tuple[Epoch, ...]] = {}
    for variant in wanted:
        context = _context(variant)
        matching = [v for v in variants if all(context.get(k) == val for k, val in v.when.items())]
        if variant != STANDARD and not matching:
            continue
        starts = sorted({v.start for v in matching if v.start is not None})
        epochs = [epoch([v for v in matching if v.start is None], None)]
        for s in starts:
            epochs.append(epoch([v for v in matching if v.start is None or v.start <= s], s))
        schedule[variant] = tuple(epochs)
    source = f"genai-prices {provider.id}/{model.id}"
    return CostSchedule(GENAI_PRICES_CURRENCY, source, schedule)


@dataclass
class GenaiBook:
    """Lookups into the bundled genai-prices data (never the network: no UpdatePrices)."""

    _cache: dict[tuple[str | None, str | None, str], CostSchedule] = field(default_factory=dict)

    def schedule(
        self, model_ref: str, *, provider_id: str | None, base_url: str | None
    ) -> CostSchedule:
        """The schedule of `model_ref` at a provider named by id, else by its API URL.

        We never guess the provider from the model name alone: a self-hosted deployment of an
        open model must not be billed at the model maker's API price.
        """
        key = (provider_id, None if provider_id else base_url, model_ref)
        if key in self._cache:
            return self._cache[key]
        from genai_prices.data_snapshot import get_snapshot

        if not provider_id and not base_url:
            raise UnknownCost(f"no provider id to look up {model_ref!r}")
        try:
            provider, model = get_snapshot().find_provider_model(
                model_ref, None, provider_id or None, None if provider_id else base_url
            )
        except LookupError as exc:
            raise UnknownCost(f"genai-prices: {exc}") from exc
        self._cache[key] = schedule = schedule_from_genai(provider, model)
        return schedule

    def context_window(
        self, model_ref: str, *, provider_id: str | None, base_url: str | None
    ) -> int | None:
        """The model's context window (input tokens) as genai-prices publishes it; None when
        the model or its window is unknown."""
        from genai_prices.data_snapshot import get_snapshot

        if not provider_id and not base_url:
            return None
        try:
            _, model = get_snapshot().find_provider_model(
                model_ref, None, provider_id or None, None if provider_id else base_url
            )
        except LookupError:
            return None
        window = getattr(model, "context_window", None)
        return window if isinstance(window, int) and window > 0 else None
