"""The single entry point: a request's exact cost and price, in ledger nano-units.

`Pricer.from_config` does all the slow work once (dataset lookups, parsing, FX), and fails there,
naming the deployment, when a cost is unknown. Per request, `quote` picks a rate table by time and
variant, multiplies six token counts by integer rates, and rounds twice: once for the cost and
once for the price, each from the exact amount (the price is never computed from a rounded cost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Protocol

from tokenworks.metering.usage import Usage
from tokenworks.money import (
    NANO_PER_UNIT,
    RATE_DENOMINATOR,
    RATE_SCALE,
    allocate,
    format_fraction,
    parse_factor,
    round_half_up,
)
from tokenworks.pricing.book import GenaiBook, UnknownCost, schedule_from_spec
from tokenworks.pricing.rates import TOKEN_CLASSES, RateTable, split_usage
from tokenworks.pricing.schedule import CostSchedule
from tokenworks.pricing.spec import CostSpec, PricingSpec, TariffSpec
from tokenworks.pricing.tariff import Ratio, Tariff, UnknownServiceTier

# An integer amount (1 / RATE_DENOMINATOR units) over this is nano-units.
_PER_NANO = RATE_DENOMINATOR // NANO_PER_UNIT

DeploymentKey = tuple[str, str, str]  # (public model, producer, upstream model)


class PricingError(Exception):
    """A request that cannot be priced: unknown deployment, tariff or service tier."""


class PricingConfigError(PricingError):
    """A config whose prices cannot be built; the message names the model and deployment."""


class ProducerLike(Protocol):
    name: str
    base_url: str
    currency: str | None


class DeploymentLike(Protocol):
    producer: str
    model: str
    cost: CostSpec | None


class ModelLike(Protocol):
    name: str

    @property
    def deployments(self) -> Sequence[DeploymentLike]: ...


@dataclass(frozen=True, slots=True)
class Quote:
    """A request's cost (what the producer charges us) and price (what the consumer pays)."""

    cost_nano: int
    price_nano: int
    currency: str
    service_tier: str


@dataclass(frozen=True, slots=True)
class Line:
    """One token class of a quote; lines add up exactly to the quote's amounts."""

    token_class: str
    tokens: int
    cost_nano: int
    price_nano: int


@dataclass(frozen=True, slots=True)
class ProducerInfo:
    name: str
    provider_id: str | None
    base_url: str | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class DeploymentCost:
    """A deployment's schedule and the exact factor from its currency to ledger currency."""

    schedule: CostSchedule
    to_ledger: Ratio

    @property
    def nano_denominator(self) -> int:
        return self.to_ledger[1] * _PER_NANO


def _upstream_tier(tier: str) -> str | None:
    return None if tier == "standard" else tier


class Pricer:
    """Prices requests from tables precomputed per deployment. Immutable; `with_*` copy it."""

    __slots__ = (
        "_account_tariffs",
        "_book",
        "_default_tariff",
        "_deployments",
        "_fx",
        "_primary",
        "_producers",
        "_tariffs",
        "currency",
    )

    def __init__(
        self,
        *,
        currency: str,
        fx: dict[str, Fraction],
        producers: dict[str, ProducerInfo],
        deployments: dict[DeploymentKey, DeploymentCost],
        primary: dict[str, DeploymentKey],
        tariffs: dict[str, Tariff],
        default_tariff: str,
        account_tariffs: dict[str, str],
        book: GenaiBook,
    ) -> None:
        assert default_tariff in tariffs
        self.currency = currency
        self._fx = fx
        self._producers = producers
        self._deployments = deployments
        self._primary = primary
        self._tariffs = tariffs
        self._default_tariff = default_tariff
        self._account_tariffs = account_tariffs
        self._book = book

    # --- building --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, *, book: GenaiBook | None = None) -> Pricer:
        """Build from the whole config (`pricing`, `producers`, `models`)."""
        pricing = getattr(config, "pricing", None) or PricingSpec()
        return cls.from_parts(pricing, config.producers, config.models, book=book)

    @classmethod
    def from_parts(
        cls,
        pricing: PricingSpec,
        producers: Sequence[ProducerLike],
        models: Sequence[ModelLike],
        *,
        book: GenaiBook | None = None,
    ) -> Pricer:
        fx = {pricing.currency: Fraction(1)}
        for code, rate in pricing.exchange_rates.items():
            if code != pricing.currency:
                fx[code] = 1 / parse_factor(rate)
        infos = {
            p.name: ProducerInfo(p.name, getattr(p, "provider", None), p.base_url, p.currency)
            for p in producers
        }
        pricer = cls(
            currency=pricing.currency,
            fx=fx,
            producers=infos,
            deployments={},
            primary={},
            tariffs={name: Tariff.from_spec(name, spec) for name, spec in pricing.tariffs.items()},
            default_tariff=pricing.default_tariff,
            account_tariffs=dict(pricing.accounts),
            book=book or GenaiBook(),
        )
        errors: list[str] = []
        for model in models:
            for j, deployment in enumerate(model.deployments):
                key = (model.name, deployment.producer, deployment.model)
                try:
                    pricer._deployments[key] = pricer._cost(
                        deployment.producer, deployment.model, deployment.cost
                    )
                except (UnknownCost, ValueError) as exc:
                    errors.append(
                        f"model {model.name!r} deployment {j} (producer {deployment.producer!r},"
                        f" upstream model {deployment.model!r}): {exc}"
                    )
                    continue
                pricer._primary.setdefault(model.name, key)
        for name, tariff in pricer._tariffs.items():
            for public_model in tariff.fixed:
                if public_model not in pricer._primary and not any(
                    k[0] == public_model for k in pricer._deployments
                ):
                    errors.append(
                        f"tariff {name!r}: fixed price for unknown model {public_model!r}"
                    )
        if errors:
            raise PricingConfigError(
                "cannot price these deployments (give the deployment a `cost:` with"
                " input_per_mtok/output_per_mtok, or the producer a genai-prices `provider:`):\n  "
                + "\n  ".join(errors)
            )
        return pricer

    def _cost(self, producer: str, upstream_model: str, spec: CostSpec | None) -> DeploymentCost:
        info = self._producers.get(producer)
        if info is None:
            raise UnknownCost(f"unknown producer {producer!r}")
        schedule: CostSchedule
        if spec is not None and spec.is_override:
            currency = spec.currency or info.currency or self.currency
            schedule = schedule_from_spec(spec, currency, f"config {producer}/{upstream_model}")
        else:
            provider_id = (spec.provider if spec else None) or info.provider_id
            model_ref = (spec.model_ref if spec else None) or upstream_model
            schedule = self._book.schedule(
                model_ref, provider_id=provider_id, base_url=info.base_url
            )
        rate = self._fx.get(schedule.currency)
        if rate is None:
            raise ValueError(
                f"prices are in {schedule.currency} but the ledger is in {self.currency};"
                f" add pricing.exchange_rates.{schedule.currency}"
            )
        return DeploymentCost(schedule, (rate.numerator, rate.denominator))

    def context_window(
        self, producer: str, upstream_model: str, cost: CostSpec | None
    ) -> int | None:
        """A deployment's context window from the price book; None when unknown (a cost
        override is a model the book does not describe: a self-hosted one may differ)."""
        info = self._producers.get(producer)
        if info is None or (cost is not None and cost.is_override):
            return None
        return self._book.context_window(
            (cost.model_ref if cost else None) or upstream_model,
            provider_id=(cost.provider if cost else None) or info.provider_id,
            base_url=info.base_url,
        )

    def _copy(self, **changes: Any) -> Pricer:
        fields: dict[str, Any] = {
            "currency": self.currency,
            "fx": self._fx,
            "producers": self._producers,
            "deployments": self._deployments,
            "primary": self._primary,
            "tariffs": self._tariffs,
            "default_tariff": self._default_tariff,
            "account_tariffs": self._account_tariffs,
            "book": self._book,
        }
        fields.update(changes)
        return Pricer(**fields)

    # --- what-if changes (each returns a new Pricer) ----------------------------------------

    def deployment_keys(self) -> list[DeploymentKey]:
        return list(self._deployments)

    def with_cost_factor(self, factor: Fraction, match: Callable[[DeploymentKey], bool]) -> Pricer:
        """Every matching deployment's cost multiplied by `factor` (e.g. 13/10 for +30%)."""
        deployments = dict(self._deployments)
        for key, dep in deployments.items():
            if match(key):
                ratio = Fraction(*dep.to_ledger) * factor
                deployments[key] = replace(dep, to_ledger=(ratio.numerator, ratio.denominator))
        return self._copy(deployments=deployments)

    def with_deployment(
        self, public_model: str, producer: str, upstream_model: str, cost: CostSpec | None
    ) -> Pricer:
        """A pricer that also knows (or re-prices) this deployment; PricingError if unpriceable."""
        try:
            dep = self._cost(producer, upstream_model, cost)
        except (UnknownCost, ValueError) as exc:
            raise PricingError(f"{producer}/{upstream_model}: {exc}") from exc
        deployments = dict(self._deployments)
        deployments[(public_model, producer, upstream_model)] = dep
        return self._copy(deployments=deployments)

    def with_cost(self, producer: str, upstream_model: str, cost: CostSpec) -> Pricer:
        """Replace what `producer` charges for `upstream_model`, for every public model."""
        pricer = self
        for key in self._deployments:
            if key[1] == producer and key[2] == upstream_model:
                pricer = pricer.with_deployment(key[0], producer, upstream_model, cost)
        return pricer

    def with_tariff(self, name: str, spec: TariffSpec) -> Pricer:
        return self._copy(tariffs={**self._tariffs, name: Tariff.from_spec(name, spec)})

    # --- per request -----------------------------------------------------------------------

    def tariff_for(self, account_id: str | None) -> str:
        """The tariff an account pays: its own if the config names one, else the default."""
        if account_id is None:
            return self._default_tariff
        return self._account_tariffs.get(account_id, self._default_tariff)

    def _resolve(
        self,
        public_model: str,
        producer: str,
        upstream_model: str,
        at: datetime,
        service_tier: str | None,
        tariff: str | None,
        batch: bool,
    ) -> tuple[DeploymentCost, RateTable, Tariff, str, Ratio, RateTable | None]:
        dep = self._deployments.get((public_model, producer, upstream_model))
        if dep is None:
            raise PricingError(
                f"no price for model {public_model!r} on {producer!r}/{upstream_model!r}"
            )
        plan = self._tariffs.get(tariff or self._default_tariff)
        if plan is None:
            raise PricingError(f"unknown tariff {tariff!r}")
        if at.tzinfo is None:
            raise PricingError("pricing time must be timezone-aware (use datetime.now(UTC))")
        try:
            tier = plan.service_tier(service_tier)
        except UnknownServiceTier as exc:
            raise PricingError(str(exc)) from exc
        table = dep.schedule.table_at(at, _upstream_tier(tier), batch)
        return dep, table, plan, tier, plan.multiplier(tier, at), plan.fixed.get(public_model)

    def _finish(
        self,
        dep: DeploymentCost,
        plan: Tariff,
        multiplier: Ratio,
        cost_amount: int,
        fixed_amount: int | None,
    ) -> tuple[int, int]:
        cost_nano = round_half_up(cost_amount * dep.to_ledger[0], dep.nano_denominator)
        m_num, m_den = multiplier
        if fixed_amount is not None:
            price_nano = round_half_up(fixed_amount * m_num, m_den * _PER_NANO)
        else:
            k_num, k_den = plan.markup
            price_nano = round_half_up(
                cost_amount * dep.to_ledger[0] * k_num * m_num,
                dep.nano_denominator * k_den * m_den,
            )
        if price_nano < cost_nano and plan.floor_at_cost:
            price_nano = cost_nano  # no price below cost unless the tariff allows it
        return cost_nano, price_nano

    def quote(
        self,
        public_model: str,
        producer: str,
        upstream_model: str,
        usage: Usage,
        *,
        at: datetime,
        service_tier: str | None = None,
        tariff: str | None = None,
        batch: bool = False,
    ) -> Quote:
        """Cost and price of a finished request, priced at `at`, the time it started."""
        dep, table, plan, tier, multiplier, fixed = self._resolve(
            public_model, producer, upstream_model, at, service_tier, tariff, batch
        )
        split = split_usage(usage)
        cost, price = self._finish(
            dep,
            plan,
            multiplier,
            table.amount(split),
            None if fixed is None else fixed.amount(split),
        )
        return Quote(cost, price, self.currency, tier)

    def worst_case(
        self,
        public_model: str,
        producer: str,
        upstream_model: str,
        input_tokens: int,
        max_output_tokens: int,
        *,
        at: datetime,
        service_tier: str | None = None,
        tariff: str | None = None,
        batch: bool = False,
    ) -> Quote:
        """An upper bound of `quote` (same `at`, tier, tariff) for any usage with at most these
        many input and output tokens, whatever the cached, cache-write and reasoning split."""
        assert input_tokens >= 0 and max_output_tokens >= 0
        dep, table, plan, tier, multiplier, fixed = self._resolve(
            public_model, producer, upstream_model, at, service_tier, tariff, batch
        )
        cost_amount = table.worst_amount(input_tokens, max_output_tokens)
        fixed_amount = (
            None if fixed is None else fixed.worst_amount(input_tokens, max_output_tokens)
        )
        cost, price = self._finish(dep, plan, multiplier, cost_amount, fixed_amount)
        return Quote(cost, price, self.currency, tier)

    def unit_prices(
        self,
        public_model: str,
        producer: str,
        upstream_model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        at: datetime,
        service_tier: str | None = None,
        tariff: str | None = None,
    ) -> tuple[Fraction, Fraction]:
        """The consumer price per million input and per million output tokens, exact, in the
        ledger currency, for a request of this size (it picks the cliff tier) at `at`, tier
        and tariff: what OpenRouter's `max_price` is compared with. Uncached input and plain
        output: the rates a price list shows."""
        dep, table, plan, _, (m_num, m_den), fixed = self._resolve(
            public_model, producer, upstream_model, at, service_tier, tariff, False
        )
        cost_rates = table.rates_for(input_tokens, output_tokens)
        to_ledger = Fraction(*dep.to_ledger)
        cost_in = Fraction(cost_rates.input, RATE_SCALE) * to_ledger
        cost_out = Fraction(cost_rates.output, RATE_SCALE) * to_ledger
        if fixed is not None:
            rates = fixed.rates_for(input_tokens, output_tokens)
            factor = Fraction(m_num, m_den)
            price_in = Fraction(rates.input, RATE_SCALE) * factor
            price_out = Fraction(rates.output, RATE_SCALE) * factor
        else:
            factor = Fraction(plan.markup[0] * m_num, plan.markup[1] * m_den)
            price_in, price_out = cost_in * factor, cost_out * factor
        if plan.floor_at_cost:  # never below cost; per rate here, `_finish` floors the sum
            price_in, price_out = max(price_in, cost_in), max(price_out, cost_out)
        return price_in, price_out

    def explain(
        self,
        public_model: str,
        producer: str,
        upstream_model: str,
        usage: Usage,
        *,
        at: datetime,
        service_tier: str | None = None,
        tariff: str | None = None,
        batch: bool = False,
    ) -> tuple[Quote, list[Line]]:
        """`quote` plus one line per token class; the lines sum exactly to the quote."""
        quote = self.quote(
            public_model, producer, upstream_model, usage,
            at=at, service_tier=service_tier, tariff=tariff, batch=batch,
        )  # fmt: skip
        dep, table, plan, _, (m_num, m_den), fixed = self._resolve(
            public_model, producer, upstream_model, at, service_tier, tariff, batch
        )
        split = split_usage(usage)
        in_tokens = split[0] + split[1] + split[2] + split[3]
        rates = table.rates_for(in_tokens, split[4] + split[5]).as_tuple()
        cost_parts = [n * r * dep.to_ledger[0] for n, r in zip(split, rates, strict=True)]
        costs = allocate(cost_parts, dep.nano_denominator)
        if fixed is not None:
            f_rates = fixed.rates_for(in_tokens, split[4] + split[5]).as_tuple()
            prices = allocate(
                [n * r * m_num for n, r in zip(split, f_rates, strict=True)], m_den * _PER_NANO
            )
        else:
            k_num, k_den = plan.markup
            prices = allocate(
                [p * k_num * m_num for p in cost_parts], dep.nano_denominator * k_den * m_den
            )
        if plan.floor_at_cost and quote.price_nano == quote.cost_nano != sum(prices):
            prices = costs  # the price was floored at cost: each line at its cost
        lines = [
            Line(cls, n, c, p)
            for cls, n, c, p in zip(TOKEN_CLASSES, split, costs, prices, strict=True)
        ]
        assert sum(line.cost_nano for line in lines) == quote.cost_nano
        assert sum(line.price_nano for line in lines) == quote.price_nano
        return quote, lines

    def list_price(
        self, public_model: str, *, tariff: str | None = None, at: datetime | None = None
    ) -> tuple[str, str]:
        """Consumer price per million input and output tokens now (or at `at`), as decimal
        strings in the ledger currency, for `GET /v1/models`: the model's first deployment,
        the tariff's default tier, the smallest context tier."""
        key = self._primary.get(public_model)
        if key is None:
            raise PricingError(f"unknown model {public_model!r}")
        at = at or datetime.now(UTC)
        dep, table, plan, _, (m_num, m_den), fixed = self._resolve(*key, at, None, tariff, False)
        if fixed is not None:
            base, factor = fixed.base, Fraction(m_num, m_den)
        else:
            k_num, k_den = plan.markup
            base = table.base
            factor = Fraction(*dep.to_ledger) * Fraction(k_num * m_num, k_den * m_den)
        return (
            format_fraction(Fraction(base.input, RATE_SCALE) * factor),
            format_fraction(Fraction(base.output, RATE_SCALE) * factor),
        )
