"""From a public model name to the deployments that may serve a request, in the order to try.

The order is the model's `routing:` strategy (or the request's `provider.sort`), narrowed and
reordered by the request's `provider` object (`dispatch/preferences.py`); unavailable
deployments go last, never dropped. Failover walks the list in that order.

    ordered     as configured (the default: this path costs what it always did)
    cheapest    lowest price for this request now (the pricer: time of day, tier, tariff),
                ties by lower cost, then configured order
    fastest     lowest expected time to the request's last token: learned time to first
                token + expected output / learned output rate (`dispatch/speeds.py`)
    weighted    random order without replacement, `weight:` the odds of going first
    throughput  (`provider.sort`) highest learned output rate first
    latency     (`provider.sort`) lowest learned time to first token first

A request's size is estimated without tokenizing: input as the body's bytes / 4, output as
its `max_tokens` (or `max_completion_tokens`) times its choices, else
`EXPECTED_OUTPUT_TOKENS`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

from tokenworks.config import Config, Deployment, Model
from tokenworks.dispatch.errors import NoProviderLeft
from tokenworks.dispatch.preferences import ProviderPrefs
from tokenworks.dispatch.speeds import Speed, Speeds
from tokenworks.metering.tokens import encoding_for
from tokenworks.metering.usage import Usage
from tokenworks.money import format_fraction
from tokenworks.pricing.quote import Pricer, PricingError

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

BYTES_PER_TOKEN = 4  # English text and JSON average about four bytes per token
EXPECTED_OUTPUT_TOKENS = 1024  # a request that does not bound its output
SORT_STRATEGY = {"price": "cheapest", "throughput": "throughput", "latency": "latency"}
_LAST = (math.inf, math.inf)


class Availability(Protocol):
    """Whether a deployment may be tried first (the dispatcher's breakers say so)."""

    def available(self, deployment: Deployment) -> bool: ...


@dataclass(frozen=True, slots=True)
class Route:
    """A public model with its deployments in configured order."""

    model: Model
    deployments: tuple[Deployment, ...]
    encoding: str


class Router:
    def __init__(
        self,
        config: Config,
        health: Availability,
        pricer: Pricer | None = None,
        *,
        speeds: Speeds | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health
        self.pricer = pricer
        self.rng = rng or random.Random()
        self.speeds = speeds or Speeds(
            (d.producer, d.model) for m in config.models for d in m.deployments
        )
        self.speeds.learning = any(m.routing == "fastest" for m in config.models)
        self.routes: dict[str, Route] = {
            m.name: Route(
                model=m,
                deployments=tuple(m.deployments),
                encoding=m.tokenizer or encoding_for(m.deployments[0].model),
            )
            for m in config.models
        }

    def get(self, name: str) -> Route | None:
        return self.routes.get(name)

    def candidates(
        self, route: Route, max_attempts: int, call: Call | None = None
    ) -> list[Deployment]:
        """The deployments to try, in order; available ones first; at most max_attempts.
        Raises NoProviderLeft when the call's `provider` object excludes every one."""
        prefs = None if call is None else call.provider
        if prefs is None and route.model.routing == "ordered":
            ranked: tuple[Deployment, ...] | list[Deployment] = route.deployments  # as today
        else:
            ranked = self._ranked(route, prefs, call)
        available = self.health.available
        cooling = [d for d in ranked if not available(d)]
        if cooling:  # behind an open breaker: tried last, never dropped
            ranked = [d for d in ranked if d not in cooling] + cooling
        if prefs is not None and not prefs.allow_fallbacks and not prefs.order:
            return list(ranked[:1])  # only the first choice, no backups
        return list(ranked[:max_attempts])

    def _ranked(
        self, route: Route, prefs: ProviderPrefs | None, call: Call | None
    ) -> list[Deployment]:
        """The strategy's order, narrowed and reordered by the `provider` object."""
        strategy = route.model.routing
        if prefs is not None and prefs.sort is not None:
            strategy = SORT_STRATEGY[prefs.sort]
        deployments = list(route.deployments)
        if prefs is not None:
            deployments = self._allowed(route, deployments, prefs, call)
        ranked = self.rank(strategy, deployments, call)
        if prefs is None or not prefs.order:
            return ranked
        listed = [d for name in prefs.order for d in ranked if d.producer.lower() == name]
        if not prefs.allow_fallbacks:
            if not listed:
                raise NoProviderLeft(
                    f"provider.order names none of the producers left for model"
                    f" '{route.model.name}' ({_names(ranked)}), and provider.allow_fallbacks"
                    " is false",
                    param="provider.order",
                )
            return listed
        order = set(prefs.order)
        return listed + [d for d in ranked if d.producer.lower() not in order]

    # -- the provider object's filters -------------------------------------------------------

    def _allowed(
        self, route: Route, deployments: list[Deployment], prefs: ProviderPrefs, call: Call | None
    ) -> list[Deployment]:
        name = route.model.name
        if prefs.only is not None:
            only = prefs.only
            deployments = [d for d in deployments if d.producer.lower() in only]
            if not deployments:
                raise NoProviderLeft(
                    f"provider.only names none of the producers of model '{name}'"
                    f" ({_names(route.deployments)})",
                    param="provider.only",
                )
        if prefs.ignore:
            ignore = prefs.ignore
            deployments = [d for d in deployments if d.producer.lower() not in ignore]
            if not deployments:
                raise NoProviderLeft(
                    f"provider.ignore excludes every producer left for model '{name}'",
                    param="provider.ignore",
                )
        if prefs.max_price is not None and call is not None:
            deployments = self._within_price(route, deployments, prefs, call)
        return deployments

    def _within_price(
        self, route: Route, deployments: list[Deployment], prefs: ProviderPrefs, call: Call
    ) -> list[Deployment]:
        """Deployments whose price per million input and output tokens, for this request now,
        is within `max_price`. One that cannot be priced for the request is not."""
        ceiling = prefs.max_price
        assert ceiling is not None and self.pricer is not None
        input_tokens, output_tokens = expected_tokens(call)
        kept: list[Deployment] = []
        prompts: list[Fraction] = []
        completions: list[Fraction] = []
        for d in deployments:
            try:
                prompt, completion = self.pricer.unit_prices(
                    route.model.name, d.producer, d.model, input_tokens, output_tokens,
                    at=call.at, service_tier=call.service_tier, tariff=call.tariff,
                )  # fmt: skip
            except PricingError:
                continue
            prompts.append(prompt)
            completions.append(completion)
            if (ceiling.prompt is None or prompt <= ceiling.prompt) and (
                ceiling.completion is None or completion <= ceiling.completion
            ):
                kept.append(d)  # `request`: no deployment here charges a per-request fee
        if not prompts:
            return deployments  # nothing prices this request (its tier): the hold says why
        if not kept:
            currency = self.pricer.currency
            cheapest = (
                f"; the lowest now are {format_fraction(min(prompts))} {currency} per million"
                f" prompt and {format_fraction(min(completions))} {currency} per million"
                " completion tokens"
                if prompts
                else ""
            )
            raise NoProviderLeft(
                f"no producer of model '{route.model.name}' left by the request's provider"
                f" object is within provider.max_price{cheapest}",
                param="provider.max_price",
            )
        return kept

    # -- strategies ----------------------------------------------------------------------------

    def rank(
        self, strategy: str, deployments: list[Deployment], call: Call | None
    ) -> list[Deployment]:
        """`deployments` in the strategy's order (health aside)."""
        if len(deployments) < 2:
            return deployments  # nothing to rank, nothing to price
        if strategy == "cheapest":
            return self._cheapest(deployments, call)
        if strategy == "weighted":
            return self._weighted(deployments)
        if strategy in ("fastest", "throughput", "latency"):
            return self._fastest(strategy, deployments, call)
        return deployments

    def _cheapest(self, deployments: list[Deployment], call: Call | None) -> list[Deployment]:
        pricer = self.pricer
        if call is None or pricer is None:
            return deployments
        input_tokens, output_tokens = expected_tokens(call)
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        model = call.public_model

        def price(d: Deployment) -> tuple[float, float]:
            try:
                quote = pricer.quote(
                    model, d.producer, d.model, usage,
                    at=call.at, service_tier=call.service_tier, tariff=call.tariff,
                )  # fmt: skip
            except PricingError:
                return _LAST  # the hold will name the problem; never first
            return quote.price_nano, quote.cost_nano

        return sorted(deployments, key=price)  # stable: ties keep the configured order

    def _weighted(self, deployments: list[Deployment]) -> list[Deployment]:
        """Weighted random order without replacement: each deployment draws an exponential
        time with rate `weight`, earliest first (a race: P(first) = weight / sum of weights,
        and so on down the rest, as Efraimidis-Spirakis). Weight 0 never arrives: only a
        fallback, in configured order."""
        rng = self.rng

        def key(d: Deployment) -> float:
            if d.weight <= 0:
                return math.inf
            return -math.log(1.0 - rng.random()) / d.weight  # lower first

        return sorted(deployments, key=key)

    def _fastest(
        self, strategy: str, deployments: list[Deployment], call: Call | None
    ) -> list[Deployment]:
        """Known deployments by their learned figures; the first one due a probe goes first
        (explored, not starved); unknown ones not due go after the known, in config order."""
        speeds = self.speeds
        speeds.learning = True  # from now on served attempts teach (a sort may ask first)
        now_s = speeds.clock()
        output_tokens = expected_tokens(call)[1] if call is not None else EXPECTED_OUTPUT_TOKENS
        probe: Deployment | None = None
        known: list[tuple[float, int, Deployment]] = []
        unknown: list[Deployment] = []
        for i, d in enumerate(deployments):
            speed = speeds.get(d.producer, d.model)
            if speed is None:
                unknown.append(d)
                continue
            if probe is None and speed.due(now_s):
                speed.probed_s = now_s
                probe = d
                continue
            score = _score(strategy, speed, output_tokens)
            if score is None:
                unknown.append(d)
            else:
                known.append((score, i, d))
        known.sort()
        ranked = [d for _, _, d in known] + unknown
        return [probe, *ranked] if probe is not None else ranked


def _score(strategy: str, speed: Speed, output_tokens: int) -> float | None:
    """Lower is better; None when the figure the strategy needs is not learned yet."""
    ttft, rate = speed.ttft_s, speed.tokens_per_s
    if strategy == "latency":
        return ttft
    if strategy == "throughput":
        return None if rate is None else -rate
    if ttft is None and rate is None:
        return None
    # A missing half counts nothing: plain answers teach only a rate (prefill included).
    return (ttft or 0.0) + (output_tokens / rate if rate else 0.0)


def expected_tokens(call: Call) -> tuple[int, int]:
    """A request's input and output tokens, estimated for ranking (never for billing)."""
    payload = call.payload
    input_tokens = max(1, call.body_bytes // BYTES_PER_TOKEN)
    if call.endpoint == "embeddings":
        return input_tokens, 0
    asked = 0
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > asked:
            asked = value
    choices = payload.get("n")
    if not isinstance(choices, int) or isinstance(choices, bool) or choices < 1:
        choices = 1
    return input_tokens, (asked or EXPECTED_OUTPUT_TOKENS) * choices


def _names(deployments: tuple[Deployment, ...] | list[Deployment]) -> str:
    return ", ".join(dict.fromkeys(d.producer for d in deployments)) or "none"
