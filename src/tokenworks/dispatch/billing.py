"""What a request may cost, and what it is charged.

Before any upstream work: the most output the request can make upstreams produce (over all
its prompts and choices), its worst-case price, and a hold on the payer's credit for it (no
hold, no call). When it is served: the price of what was used, at most the hold (`within_hold`),
settled with the usage row in the same commit; otherwise the hold is voided now, not at its
expiry. An answer whose settlement fails is withheld: no answer goes out without its charge.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tokenworks.config import Deployment, Model
from tokenworks.dispatch.errors import (
    HoldRefused,
    HoldUnavailable,
    InvalidCall,
    SettlementFailed,
)
from tokenworks.dispatch.recording import Recorder
from tokenworks.ledger import HoldClosed, HoldView, Ledger, LedgerBusy, LedgerError, Refused
from tokenworks.ledger.domain import MAX_AMOUNT_NANO
from tokenworks.metering.usage import Usage
from tokenworks.metrics import Metrics
from tokenworks.money import format_nano
from tokenworks.pricing.quote import Pricer, PricingError, Quote
from tokenworks.wire.inputs import unseen_input

if TYPE_CHECKING:
    from tokenworks.dispatch.relay import Call

HTTP_CLIENT_CLOSED = 499  # nginx's convention for "the client went away"
HOLD_MARGIN_S = 60.0  # a hold outlives the longest upstream timeout by this much
MAX_HOLD_TTL_S = 86_400.0  # the ledger's longest hold
CLAMP_LOG_INTERVAL_S = 10.0  # at most one warning per interval; the metrics count every one
# When neither the config nor the price book says: no published model produces more than
# 128 Ki tokens in one choice (GPT-5, Claude, Gemini cap output at 64-128 Ki), and no published
# context window is larger than 10 Mi tokens (Llama 4 Scout's 10M).
DEFAULT_MAX_OUTPUT_TOKENS = 131_072
DEFAULT_CONTEXT_WINDOW_TOKENS = 10_485_760
SETTLEMENT_FAILED = SettlementFailed.code

log = logging.getLogger("tokenworks.relay")


@dataclass(frozen=True, slots=True)
class ModelBounds:
    """What one choice of a model can produce and use, resolved once at start."""

    max_output_tokens: int
    context_window_tokens: int

    @classmethod
    def of(cls, model: Model, pricer: Pricer) -> ModelBounds:
        """The config's figures, else the price book's context window (the largest over the
        deployments; one the book does not know counts as the generous default)."""
        window = model.context_window_tokens or max(
            pricer.context_window(d.producer, d.model, d.cost) or DEFAULT_CONTEXT_WINDOW_TOKENS
            for d in model.deployments
        )
        max_output = model.max_output_tokens or min(window, DEFAULT_MAX_OUTPUT_TOKENS)
        return cls(max_output, max(window, max_output))


def output_bound(call: Call, bounds: ModelBounds) -> int:
    """The most output tokens this request may make upstreams produce, over all its prompts
    and choices; sets `call.usage_limit_tokens`. An output limit past the model's is the
    client's error (a 400 naming it), never a hold the ledger cannot take."""
    payload = call.payload
    choices = 1
    for name in ("n", "best_of"):  # upstreams bill every candidate they generate
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > choices:
            choices = value
    choices *= _prompt_count(call.endpoint, payload)
    call.usage_limit_tokens = bounds.context_window_tokens * choices
    if call.endpoint == "embeddings":
        return 0
    asked = 0
    # An upstream may honour either field: hold for the larger one.
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if value > bounds.max_output_tokens:
            raise InvalidCall(
                f"'{name}' is {value}, but model '{call.public_model}' produces at most"
                f" {bounds.max_output_tokens} tokens per choice",
                param=name,
            )
        asked = max(asked, value)
    return (asked or bounds.max_output_tokens) * choices


def input_bound(call: Call, bounds: ModelBounds) -> int:
    """The most input tokens this request can be billed: its size in bytes (a token is at
    least one byte), unless it carries what the upstream expands beyond its bytes (images,
    audio, files, server-side tools, a stored conversation: `wire.inputs`); then the model's
    context window for each prompt, the most a prompt can hold. So a price above the hold
    (a clamp) means an upstream misbehaved, not that the hold missed an image."""
    if unseen_input(call.payload) is None:
        return call.body_bytes
    return bounds.context_window_tokens * _prompt_count(call.endpoint, call.payload)


_ONE_PROMPT = frozenset({"chat", "messages", "responses"})


def _prompt_count(endpoint: str, payload: dict[str, Any]) -> int:
    """How many prompts a request carries: an upstream answers each one (`n` times)."""
    if endpoint in _ONE_PROMPT:
        return 1
    value = payload.get("prompt" if endpoint == "completions" else "input")
    if not isinstance(value, list) or not value:
        return 1
    if isinstance(value[0], int):  # one pre-tokenised prompt, unless more follow it
        return 1 + sum(1 for v in value if not isinstance(v, int))
    return len(value)


class Billing:
    def __init__(
        self,
        pricer: Pricer,
        metrics: Metrics,
        recorder: Recorder,
        bounds: dict[str, ModelBounds],
    ) -> None:
        self.pricer = pricer
        self.metrics = metrics
        self.recorder = recorder
        self.bounds = bounds
        self.ledger: Ledger | None = None  # set when the gateway starts
        self._clamp_logged_s = -CLAMP_LOG_INTERVAL_S

    def worst_case(self, call: Call, candidates: list[Deployment]) -> int:
        """The most this request can cost on any of these deployments; raises the client's
        error (a 400) for a request that cannot be priced or held.

        Input is bounded by the body's size in bytes (a token is at least one byte), which
        costs nothing to compute; counting with the tokenizer would cost ~20 µs per KiB on
        the event loop. A body with media or server-side tools is bounded by the context
        window instead (`input_bound`). The excess over the actual price is released at
        settlement.
        """
        bounds = self.bounds[call.public_model]
        output_tokens = call.max_output_tokens = output_bound(call, bounds)
        input_tokens = input_bound(call, bounds)
        worst_nano = 0
        try:  # an unknown service tier or tariff is the client's error, found before any work
            for d in candidates:
                quote = self.pricer.worst_case(
                    call.public_model, d.producer, d.model, input_tokens, output_tokens,
                    at=call.at, service_tier=call.service_tier, tariff=call.tariff,
                )  # fmt: skip
                worst_nano = max(worst_nano, quote.price_nano)
        except PricingError as exc:
            raise InvalidCall(str(exc), param="service_tier") from exc
        if worst_nano > MAX_AMOUNT_NANO:  # more than any one ledger operation can hold
            raise InvalidCall(
                f"this request may cost up to {format_nano(worst_nano)}, more than one request"
                " can be charged; lower max_tokens, n or the number of prompts",
                param=_size_param(call.payload),
            )
        return worst_nano

    async def hold(self, call: Call, worst: int, attempts_s: float) -> HoldView:
        """Reserve the worst-case price before any upstream work: no hold, no call.
        `attempts_s`: how long every attempt together may take."""
        ledger = self.ledger
        assert ledger is not None and call.key.account_id is not None
        # The hold must outlive every attempt, or a slow failover could be served after its
        # hold expired.
        ttl_s = attempts_s + HOLD_MARGIN_S
        # A stream outliving this keeps its hold alive (`extend_hold`); `not <=` also catches NaN.
        call.hold_ttl_s = ttl_s if ttl_s <= MAX_HOLD_TTL_S else MAX_HOLD_TTL_S
        call.hold_at_s = time.monotonic()
        try:
            return await ledger.hold(
                [int(call.key.account_id)],
                worst,
                request_id=call.request_id,
                key_scopes=[call.key.id],
                ttl_s=call.hold_ttl_s,
            )
        except LedgerBusy:
            raise  # the ledger's writer is behind: not a money problem, answered as such
        except Refused as exc:
            self.metrics.refused.labels(str(exc.reason)).inc()
            error = HoldRefused(exc)
            # Refusals are metered too: a runaway agent shows up in usage, not only in logs.
            self.recorder.record(
                call, None, error.status, Usage(), ttft_s=None, error=error.message
            )
            raise error from exc
        except LedgerError as exc:
            raise HoldUnavailable(f"the ledger cannot take holds now: {exc}") from exc

    def price(
        self, call: Call, deployment: Deployment, usage: Usage, reported_tier: Any
    ) -> Quote | None:
        """Cost and price of what was used, at the tier the upstream says it served."""
        tiers = [reported_tier] if isinstance(reported_tier, str) else []
        for tier in [*tiers, call.service_tier]:
            try:
                quote = self.pricer.quote(
                    call.public_model, deployment.producer, deployment.model, usage,
                    at=call.at, service_tier=tier, tariff=call.tariff,
                )  # fmt: skip
            except PricingError:
                continue  # e.g. the upstream reported a tier we have no price for
            return self.within_hold(call, deployment, quote)
        self.metrics.upstream_errors.labels(deployment.producer, "unpriced").inc()
        return None

    def within_hold(self, call: Call, deployment: Deployment, quote: Quote) -> Quote:
        """A paying request is charged at most its hold, and every figure it shows (usage
        cost, price header, usage row) is what it was charged.

        A price above the hold is revenue lost, and a sign that an upstream over-reports (the
        worst case bounds media and server-side tools by the context window): the metrics
        count each such request and the shortfall by model and key, worth an alert, and the
        usage record keeps the shortfall (`clamped_nano`)."""
        hold = call.hold
        if hold is None or quote.price_nano <= hold.amount_nano:
            return quote
        shortfall_nano = quote.price_nano - hold.amount_nano
        call.clamped_nano = shortfall_nano
        self.metrics.clamped.labels(call.public_model, call.key.id).inc(shortfall_nano)
        self.metrics.clamped_requests.labels(call.public_model, call.key.id).inc()
        now_s = time.monotonic()
        if now_s - self._clamp_logged_s >= CLAMP_LOG_INTERVAL_S:
            self._clamp_logged_s = now_s
            log.warning(
                "request %s: price %d nano above its hold %d on %s (%s); charged the hold "
                "(tokenworks_clamped_requests counts every one)",
                call.request_id, quote.price_nano, hold.amount_nano, call.public_model,
                deployment.producer,
            )  # fmt: skip
        return replace(quote, price_nano=hold.amount_nano)

    async def conclude(
        self,
        call: Call,
        deployment: Deployment,
        status: int,
        usage: Usage,
        quote: Quote | None,
        *,
        ttft_s: float | None,
        error: str | None,
        durable: bool,
    ) -> tuple[bool, int | None]:
        """Charge a served call and record it, the usage row in the settlement's transaction.

        Returns (charged, the payer's balance after it). Not charged: the settlement failed;
        the row says so, the hold is released now, and the caller must not complete the
        answer: no answer goes out without its charge."""
        hold, ledger = call.hold, self.ledger
        if hold is None or ledger is None:
            self.recorder.record(
                call, deployment, status, usage, ttft_s=ttft_s, error=error, quote=quote
            )
            return True, None
        if quote is None:
            # An unpriceable answer (should not happen: prices are checked at start) is
            # charged its worst case rather than given away.
            quote = Quote(
                0, hold.amount_nano, self.pricer.currency, call.service_tier or "standard"
            )
        try:
            # Applied now, durable later: the usage row attached next joins the same commit
            # (nothing awaits in between, so the writer cannot take one without the other).
            await ledger.settle(
                hold.id,
                price_nano=quote.price_nano,
                cost_nano=min(quote.cost_nano, MAX_AMOUNT_NANO),
                producer=deployment.producer,
                model=call.public_model,
                durable=False,
            )
        except LedgerError as exc:
            await self._unsettled(call, deployment, status, usage, quote, ttft_s, error, exc)
            return False, None
        record = self.recorder.record(
            call, deployment, status, usage, ttft_s=ttft_s, error=error, quote=quote
        )
        if durable:
            try:
                await ledger.flush()
            except LedgerError as exc:  # the commit carrying the charge and the row failed
                self.metrics.settlement_failures.inc()
                log.warning("request %s: settlement not durable: %s", call.request_id, exc)
                self.recorder.store.submit(
                    replace(
                        record,
                        status=_unsettled_status(status),
                        error=joined(error, f"settlement failed: {exc}"),
                        price_nano=0,
                    )
                )
                return False, None
        # What this key can still spend: the credit it draws on, capped by its budgets.
        return True, ledger.spendable(int(hold_payer(call)), [call.key.id])

    async def _unsettled(
        self,
        call: Call,
        deployment: Deployment,
        status: int,
        usage: Usage,
        quote: Quote,
        ttft_s: float | None,
        error: str | None,
        exc: LedgerError,
    ) -> None:
        """A settlement the ledger refused: record the request as not charged, release the
        hold now (not at its expiry)."""
        self.metrics.settlement_failures.inc()
        log.warning("request %s: settlement failed: %r", call.request_id, exc)
        self.recorder.record(
            call,
            deployment,
            _unsettled_status(status),
            usage,
            ttft_s=ttft_s,
            error=joined(error, f"settlement failed: {exc}"),
            quote=replace(quote, price_nano=0),  # what the producer bills us, nothing charged
        )
        hold, ledger = call.hold, self.ledger
        if hold is not None and ledger is not None:
            with contextlib.suppress(LedgerError):  # already closed, or the store is down
                await ledger.void(hold.id)

    async def extend_hold(self, call: Call) -> None:
        """Keep a live request's hold from expiring under it."""
        if call.hold is not None and self.ledger is not None:
            with contextlib.suppress(LedgerError):  # closed: nothing left to keep alive
                await self.ledger.extend_hold(call.hold.id, call.hold_ttl_s)

    async def void(self, call: Call) -> None:
        """Release a request's hold now: nothing was served, or the client left."""
        if call.hold is not None and self.ledger is not None:
            try:
                await self.ledger.void(call.hold.id)
            except HoldClosed:
                pass  # already settled: the answer was served and charged
            except LedgerError:
                self.metrics.settlement_failures.inc()


def _unsettled_status(status: int) -> int:
    """The status recorded for an answer that could not be charged: the client was not given
    it (a 502), unless it had already gone away."""
    return status if status == HTTP_CLIENT_CLOSED else 502


def joined(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _size_param(payload: dict[str, Any]) -> str:
    """The parameter to name when a request's worst case is too large to hold."""
    for name in ("n", "best_of"):
        value = payload.get(name)
        if isinstance(value, int) and value > 1:
            return name
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if name in payload:
            return name
    return "prompt" if "prompt" in payload else "max_tokens"


def hold_payer(call: Call) -> str:
    assert call.key.account_id is not None
    return call.key.account_id
